"""msdseg's own processes reuse freed memory instead of faulting fresh pages in for every tensor."""
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.integration  # a child process of its own: mallopt changes the whole process

SCRIPT = textwrap.dedent("""
    import resource, sys
    import numpy as np
    if sys.argv[1] == "keep":
        from msdseg.core.allocator import keep_freed_memory
        assert keep_freed_memory()
    def faults_of_one_tensor():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = np.ones(50_000_000, dtype=np.float32)  # 200 MB, far above glibc's mmap threshold
        del a
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    faults_of_one_tensor()
    print(faults_of_one_tensor())
""")


def _second_tensor_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_tensor_is_reused_without_page_faults():
    # with transparent huge pages one fault can bring in 2 MB, so count faults, not bytes
    fresh = _second_tensor_faults("default")
    assert fresh >= 50, "glibc maps (and the kernel faults in) a fresh block for every large tensor"
    assert _second_tensor_faults("keep") <= fresh // 20


def test_the_msdseg_command_and_the_pool_workers_keep_freed_memory():
    from pathlib import Path

    import msdseg

    root = Path(msdseg.__file__).parent
    assert "keep_freed_memory()" in (root / "cli" / "main.py").read_text()
    assert "keep_freed_memory()" in (root / "batch" / "pool.py").read_text()
