"""pytest configuration of the benchmarks (pytest-benchmark).

The unit tests never collect these: ``testpaths = ["tests"]`` and the files here are
named ``bench_*.py``, which pytest's default ``python_files`` (``test_*.py``) skips.
This conftest makes ``pytest benchmarks/`` (or ``pytest benchmarks/bench_x.py``)
collect them, and provides

* ``--bench-shapes=tiny,decode``: shapes from ``shapes.py`` to run (default:
  ``$PROSG_BENCH_SHAPES``, else the per-device defaults);
* ``--bench-devices=cpu,cuda``: devices to run (default: cpu, plus cuda when
  available);
* ``--bench-threads=N``: ``torch.set_num_threads(N)`` for the CPU runs (on a loaded
  machine, intra-op threads that wait on each other at OpenMP barriers make CPU
  timings meaningless: use 1 there);
* the ``case`` parametrisation: every benchmark taking a ``case`` argument runs for
  each (device, dtype, shape) of :func:`cases`;
* the ``timed`` fixture: ``benchmark(timed(fn))`` synchronises CUDA after each call,
  so the wall-clock timer measures the kernels, not their launch.

Benchmark files get these through fixtures (``case``, ``timed``) and import shapes
from ``shapes.py``; they should not import this module (``tests/conftest.py`` has the
same module name).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from shapes import Shape, selected


def pytest_addoption(parser):
    group = parser.getgroup("prosg benchmarks")
    group.addoption("--bench-shapes", default=None, help="comma-separated shape names from benchmarks/shapes.py")
    group.addoption("--bench-devices", default=None, help="comma-separated devices (cpu, cuda); default: all available")
    group.addoption("--bench-threads", type=int, default=None,
                    help="torch.set_num_threads for the run (default: torch's, i.e. $OMP_NUM_THREADS or the core count)")


def pytest_configure(config):
    threads = config.getoption("--bench-threads", default=None)
    if threads:
        torch.set_num_threads(threads)


def pytest_collect_file(file_path, parent):
    # A file named on the command line is already collected by pytest's python plugin
    # whatever its name; collecting it here too would run every benchmark twice.
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_") or parent.session.isinitpath(file_path):
        return None
    return parent.session.gethookproxy(file_path).pytest_pycollect_makemodule(module_path=file_path, parent=parent)


#: Benchmark dtypes per device: float32 on the CPU (its fast path), and on CUDA both
#: bfloat16 (what the model runs in) and float32.
DTYPES = {"cpu": [torch.float32], "cuda": [torch.bfloat16, torch.float32]}


@dataclass(frozen=True)
class Case:
    device: str
    dtype: torch.dtype
    shape: Shape

    @property
    def id(self) -> str:
        return f"{self.device}-{str(self.dtype).removeprefix('torch.')}-{self.shape.name}"


def devices(config) -> list[str]:
    opt = config.getoption("--bench-devices")
    if opt:
        wanted = [d.strip() for d in opt.split(",") if d.strip()]
        if "cuda" in wanted and not torch.cuda.is_available():
            raise pytest.UsageError("--bench-devices asks for cuda but torch.cuda.is_available() is False")
        return wanted
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def cases(config) -> list[Case]:
    override = config.getoption("--bench-shapes")
    return [Case(dev, dt, s) for dev in devices(config) for dt in DTYPES[dev] for s in selected(dev, override)]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cs = cases(metafunc.config)
        metafunc.parametrize("case", cs, ids=[c.id for c in cs])


@pytest.fixture
def timed(case):
    """``timed(fn)``: ``fn`` followed, on CUDA, by a device synchronisation, so that
    pytest-benchmark's wall-clock timer measures the kernels and not their launch."""

    def wrap(fn):
        if case.device != "cuda":
            return fn

        def run():
            out = fn()
            torch.cuda.synchronize()
            return out

        return run

    return wrap


@pytest.fixture(autouse=True)
def _bench_seed():
    torch.manual_seed(0)
    yield
