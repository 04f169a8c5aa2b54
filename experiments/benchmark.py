"""Speed and peak memory of MultiMax against SoftMax, measured side by side in one process.

    python -m experiments.benchmark [attention.shapes=...] [repeats=10] [threads=2]

Rows of each section run interleaved: after ``warmup`` untimed runs (compiles happen there),
each round times every row once, so the rows of one round share the machine's load. Each
ratio is taken within a round (a row's time over its reference row's time in that round)
and reported as the median over the rounds with the range, ``median [min–max]``; a target
counts as met on the median. Time and memory are compared against what a user would
otherwise run: PyTorch SDPA softmax for attention, ``linear`` → ``F.cross_entropy(σ(z))``
for the output layer, the softmax model for training steps. Writes
``results/speed_cpu.md`` (``speed_gpu.md`` on a GPU) and the run's ``results.json``. Peak
memory: on the CPU the high-water mark of live bytes in torch's CPU allocator during one
call, from ``torch.profiler`` memory events (inputs excluded); on a GPU
``torch.cuda.max_memory_allocated`` over the call. ``main`` returns MultiMax (auto) over
SDPA, fwd+bwd at the DeiT-small shape (lower is better: ``hydra.sweeper.direction=minimize``).
"""

import hydra
from omegaconf import DictConfig

from experiments.config import app_help  # noqa: F401 - registers the --help resolver
from experiments.pipelines.benchmark.run import run


@hydra.main(config_path="../configs", config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> float:
    return run(cfg)


if __name__ == "__main__":
    main()
