"""jaxsmooth.train.runtime: when `jaxsmooth train` re-executes itself under a caching allocator, and with what
environment. (The re-execution itself is exercised by test_train.py::test_cli_sigterm_then_resume.)"""

import sys

import pytest

from jaxsmooth.train import runtime

TC = ("libtcmalloc_minimal.so.4", {})
JE = ("libjemalloc.so.2", {"MALLOC_CONF": "oversize_threshold:0,dirty_decay_ms:30000"})
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux-only")


@linux_only
def test_preload_env_prepends_the_allocator_and_marks_the_process():
    env = runtime.preload_env({"PATH": "/bin", "LD_PRELOAD": "libfoo.so"}, TC)
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4 libfoo.so"
    assert env["PATH"] == "/bin" and env[runtime._DONE] == "libtcmalloc_minimal.so.4"
    # the re-executed process (marked) does not go again: no exec loop
    assert runtime.preload_env(env, TC) is None


@linux_only
def test_preload_env_keeps_user_settings_and_honours_opt_out():
    assert runtime.preload_env({}, JE)["MALLOC_CONF"] == JE[1]["MALLOC_CONF"]
    assert runtime.preload_env({"MALLOC_CONF": "narenas:2"}, JE)["MALLOC_CONF"] == "narenas:2"
    for off in ("system", "0", "off"):
        assert runtime.preload_env({runtime.ENV: off}, TC) is None
    assert runtime.preload_env({"LD_PRELOAD": "/x/libjemalloc.so.2"}, TC) is None  # already has one
    assert runtime.preload_env({}, None) is None  # none installed: run as we are


@linux_only
def test_explicit_allocator_path(tmp_path):
    lib = tmp_path / "libmine.so"
    lib.write_bytes(b"")
    env = runtime.preload_env({runtime.ENV: str(lib)}, None)
    assert env["LD_PRELOAD"] == str(lib)
    with pytest.raises(ValueError, match="JAXSMOOTH_ALLOCATOR"):
        runtime.preload_env({runtime.ENV: str(tmp_path / "missing.so")}, TC)


def test_active_allocator_reports_this_process():
    assert runtime.active_allocator() in ("system", "tcmalloc", "jemalloc")
