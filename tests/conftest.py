"""Test-wide isolation of process-global state that real components keep.

Hydra keeps its version base and its initialised search path in process-wide singletons.
Importing any of our Hydra apps sets the version base to 1.3 (``@hydra.main(version_base=
None)`` does so at decoration time), while fairseq 0.12, used in-process by the plugin tests,
still calls Hydra's pre-1.2 ``hydra.experimental.initialize``, which raises under a 1.2+
base. So: fairseq tests run under the 1.1 base fairseq was written for, and every test leaves
the singletons as it found them.
"""

import os
import shutil
import subprocess

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# `make` exports HYDRA_FULL_ERROR=1, which a user does not have: errors are tested as a user
# sees them (the tests of the traceback set it themselves).
os.environ.pop("HYDRA_FULL_ERROR", None)


@pytest.fixture(autouse=True)
def _isolate_hydra_singletons(request):
    from hydra.core.global_hydra import GlobalHydra
    from hydra.version import VersionBase
    from packaging.version import Version

    version = VersionBase.instance()
    saved = version.version_base
    if "fairseq" in request.module.__name__:
        version.version_base = Version("1.1")
    yield
    version.version_base = saved
    GlobalHydra.instance().clear()


@pytest.fixture
def damaged_digits(tmp_path):
    """A digits tree with one PNG cut short (it still opens) and one that is not an image
    (the vision pipeline's bad-image handling, in process and through the app)."""
    from experiments.pipelines.vision.digits import write_digits

    root = write_digits(tmp_path / "digits")
    files = sorted((root / "train").glob("*/*.png"))
    cut, junk = files[5], files[700]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    junk.write_bytes(b"not an image")
    return root, cut, junk


def slurm_unreachable() -> str | None:
    """Why no SLURM job can run from here (None: a cluster answers, with accounting)."""
    if shutil.which("sbatch") is None:
        return (
            "no SLURM client here (start a one-node cluster: sudo scripts/slurm_cluster.sh start)"
        )
    for probe in (["sinfo", "-h", "-o", "%T"], ["sacct", "-n", "-X", "-S", "now-1minutes"]):
        try:  # no timeout of our own: Slurm's clients give up after its MessageTimeout
            done = subprocess.run(probe, capture_output=True, text=True)
        except OSError as err:
            return f"{probe[0]} does not answer ({err}); scripts/slurm_cluster.sh start"
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return f"{probe[0]} fails ({why}); scripts/slurm_cluster.sh start"
    return None


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slurm`` skip, with the reason, where no cluster is reachable."""
    marked = [item for item in items if item.get_closest_marker("slurm") is not None]
    reason = slurm_unreachable() if marked else None
    for item in marked if reason else []:
        item.add_marker(pytest.mark.skip(reason=f"no SLURM cluster: {reason}"))
