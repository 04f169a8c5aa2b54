"""The simplex picture: every normaliser applied to one path of 3-element scores.

The path x(θ) = r·(cos θ, cos(θ − 2π/3), cos(θ + 2π/3)) visits every ordering of three
scores: one clear winner (θ = 0, 2π/3, 4π/3) and two tied winners over a loser (θ = π/3, π,
5π/3). A normaliser that is sparse *and* multi-modal maps the tied inputs to the middle of an
edge (the loser gets exactly or nearly zero, the winners share the mass) and the clear
winners near a vertex. Softmax at a low temperature collapses towards the vertices, at a high
temperature leaks mass into the interior.

    python -m scripts.simplex_figure --out results/figures
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.pipelines.report.simplex import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
