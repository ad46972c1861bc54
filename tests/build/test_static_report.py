"""Every GPU kernel compiled for sm_90 shows what it declares (benchmarks/static_report.py).

One report run per test session compiles every Triton ``AOT_CASES`` entry and every csrc/cuda/*.cu file and
rewrites benchmarks/results/static/sm90.md. Each kernel's test fails on a FAIL check, on a compile error and
on a check that passes although declared known (drop the declaration); a kernel whose only failures are
declared known is reported as xfail with their reasons.
"""
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import static_report

REPO = Path(__file__).resolve().parents[2]
TRITON_SOURCES = sorted((REPO / "elva_kernels" / "triton").glob("*.py"))
CUDA_SOURCES = sorted((REPO / "csrc" / "cuda").glob("*.cu"))

def triton_kernels(path: Path) -> list[str]:
    return re.findall(r"@triton\.jit\s+def (\w+_kernel)\(", path.read_text())


KERNELS = [(p.relative_to(REPO).as_posix(), k) for p in TRITON_SOURCES for k in triton_kernels(p)] + [
    (p.relative_to(REPO).as_posix(), k) for p in CUDA_SOURCES for k in static_report.parse_cuda_expectations(
        p.read_text())]


def report(args: list[str], tmp: Path) -> tuple[int, list[dict], str]:
    out = tmp / "report.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "static_report.py"), "--json", str(out), *args],
                          cwd=REPO, capture_output=True, text=True)
    rows = json.loads(out.read_text()) if out.exists() else []
    return done.returncode, rows, done.stdout + done.stderr


@pytest.fixture(scope="session")
def rows(tmp_path_factory):
    code, rows, output = report([], tmp_path_factory.mktemp("static"))
    assert rows, f"the report wrote nothing (exit {code}):\n{output[-4000:]}"
    return rows


@pytest.mark.parametrize("source,kernel", KERNELS, ids=[f"{Path(s).name}::{k}" for s, k in KERNELS])
def test_kernel_meets_its_declaration(rows, source, kernel):
    mine = [row for row in rows if row["source"] == source and row["kernel"] == kernel]
    assert mine, f"{kernel} in {source} was not compiled: give it an AOT case (Triton) or check its name"
    problems, known = [], []
    for row in mine:
        if "error" in row:
            problems.append(f"{row['variant']}: {row['error']}")
            continue
        for name, check in row["checks"].items():
            line = f"{row['variant']}: {name}: {check['detail']}"
            if check["status"] == "FAIL":
                problems.append(line)
            elif check["status"] == "fixed":
                problems.append(line + " -> it passes now: remove it from the known failures")
            elif check["status"] == "known":
                known.append(line)
    assert not problems, "\n".join(problems)
    if known:
        pytest.xfail(f"{len(known)} known failures, e.g. " + "; ".join(sorted(set(known))[:3]))


def test_every_launched_triton_kernel_is_a_jit_kernel_with_cases():
    """A kernel launched as ``name[grid](...)`` but missing from the parametrisation would go unchecked."""
    for path in TRITON_SOURCES:
        launched = set(re.findall(r"\b(\w+_kernel)\[", path.read_text()))
        assert launched <= set(triton_kernels(path)), f"{path.name}: {sorted(launched - set(triton_kernels(path)))}"


def test_the_report_file_lists_every_row(rows):
    text = (REPO / "benchmarks" / "results" / "static" / "sm90.md").read_text()
    for row in rows:
        assert f"| {row['kernel']} | {row['variant']} |" in text


BROKEN_TRITON = '''
import torch
import triton
import triton.language as tl

from elva_kernels.triton import aot


@triton.jit
def mismatched_kernel(a_ptr, out_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offsets[:, None] * BLOCK + offsets[None, :])
    b = tl.load(a_ptr + offsets)  # a vector: [BLOCK, BLOCK] @ [BLOCK] is not a matrix product
    tl.store(out_ptr + offsets[:, None] * BLOCK + offsets[None, :], tl.dot(a, b))


@triton.jit
def scalar_kernel(a_ptr, out_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, tl.load(a_ptr + offsets) * 2.0)


AOT_CASES = [
    aot.Case(mismatched_kernel, "broken", dict(a_ptr=aot.meta(64, 64, dtype=torch.float16),
                                                out_ptr=aot.meta(64, 64), BLOCK=64), aot.Expect()),
    # compiles, but declares a tensor-core main loop it does not have
    aot.Case(scalar_kernel, "no dot", dict(a_ptr=aot.meta(64), out_ptr=aot.meta(64), BLOCK=64),
             aot.Expect(tensor_cores="HGMMA")),
]
'''

AUTOTUNED_TRITON = '''
import torch
import triton
import triton.language as tl

from elva_kernels.triton import aot


@triton.autotune(configs=[triton.Config({"BLOCK": 64}, num_warps=2), triton.Config({"BLOCK": 128}, num_warps=4)],
                 key=["n"])
@triton.jit
def scale_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) * 2.0, mask=offsets < n)


AOT_CASES = [aot.Case(scale_kernel, "fp32", dict(x_ptr=aot.meta(4096), out_ptr=aot.meta(4096), n=4096),
                      aot.Expect())]
'''


def test_every_autotune_config_is_compiled_with_the_jit_specialisation(tmp_path):
    module = tmp_path / "autotuned_kernels.py"
    module.write_text(textwrap.dedent(AUTOTUNED_TRITON))
    code, rows, output = report(["--sources", "triton", "--triton-module", str(module), "--no-write"], tmp_path)
    assert code == 0, output
    assert [(row["kernel"], row["options"]["num_warps"]) for row in rows] == [("scale_kernel", 2), ("scale_kernel", 4)]
    assert "BLOCK=64" in rows[0]["variant"] and "BLOCK=128" in rows[1]["variant"]


BROKEN_CUDA = '''
// sm90-expect: max_spill_bytes=0
__global__ void broken_kernel(float* out) { out[threadIdx.x] = undeclared_name; }
'''

UNTRUE_CUDA = '''
// sm90-expect: tensor_cores=HMMA
__global__ void scale_kernel(float* out, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] *= 2.0f;
}
'''


def test_a_broken_triton_kernel_or_an_untrue_declaration_fails(tmp_path):
    module = tmp_path / "broken_kernels.py"
    module.write_text(textwrap.dedent(BROKEN_TRITON))
    code, rows, output = report(["--sources", "triton", "--triton-module", str(module), "--no-write"], tmp_path)
    assert code == 1, output
    by_kernel = {row["kernel"]: row for row in rows}
    assert "error" in by_kernel["mismatched_kernel"]
    assert by_kernel["scalar_kernel"]["checks"]["tensor_cores"]["status"] == "FAIL"


def test_a_broken_cu_file_or_an_untrue_declaration_fails(tmp_path):
    broken, untrue = tmp_path / "broken.cu", tmp_path / "untrue.cu"
    broken.write_text(BROKEN_CUDA)
    untrue.write_text(UNTRUE_CUDA)
    code, rows, output = report(["--sources", "cuda", "--cu", str(broken), "--cu", str(untrue), "--no-write"],
                                tmp_path)
    assert code == 1, output
    by_source = {Path(row["source"]).name: row for row in rows}
    assert "undeclared_name" in by_source["broken.cu"]["error"]
    assert by_source["untrue.cu"]["checks"]["tensor_cores"]["status"] == "FAIL"
    assert by_source["untrue.cu"]["checks"]["spills"]["status"] == "pass"


def sass(*lines: str) -> str:
    """A cuobjdump -sass listing of one function, 16 bytes per instruction from address 0."""
    body = "\n".join(f"        /*{16 * i:04x}*/                   {text} ;" for i, text in enumerate(lines))
    return f"\t\tFunction : kernel\n{body}\n"


def test_loops_main_loop_and_shortest_epilogue_path():
    listing = sass(
        "S2R R0, SR_TID.X",                # 0x00  prologue
        "MOV R1, RZ",                      # 0x10  tile loop header
        "HMMA.16816.F32 R4, R8, R12, R4",  # 0x20  main loop header
        "HMMA.16816.F32 R4, R8, R12, R4",  # 0x30
        "@P0 BRA 0x20",                    # 0x40  main loop latch
        "FSETP.GT.AND P1, PT, R4, R5, PT",  # 0x50  epilogue: one compare per score
        "@!P1 BRA 0x90",                   # 0x60  the rare branch is skipped
        "ISETP.GE.U32.AND P2, PT, R1, R2, PT",  # 0x70  rare: a 64-bit compare
        "ISETP.GE.AND.EX P2, PT, R1, R2, PT, P2",  # 0x80
        "IADD3 R1, R1, 0x1, RZ",           # 0x90
        "@P3 BRA.DIV UR4, 0xe0",           # 0xa0  divergence is handled out of line
        "@P4 BRA 0x10",                    # 0xb0  tile loop latch
        "EXIT",                            # 0xc0
        "BRA 0xd0",                        # 0xd0  padding: an unreachable self-loop
        "WARPSYNC.COLLECTIVE R3, 0xf0",    # 0xe0  out-of-line code that branches back: not a loop
        "BRA 0xb0",                        # 0xf0
    )
    instructions = static_report.parse_sass(listing)["kernel"]
    summary = static_report.loop_summary(instructions, scores_per_thread=2)
    assert summary["mma_shapes"] == ["HMMA.16816.F32"]
    assert summary["main_loop"]["hmma"] == 2 and summary["main_loop"]["instructions"] == 3
    assert summary["loops"] == 2  # the main loop and the tile loop; neither the padding nor the out-of-line code
    epilogue = summary["epilogue"]
    assert epilogue["shortest_path"] == 6  # 0x10, 0x50, 0x60, 0x90, 0xa0, 0xb0
    assert epilogue["all_paths"] == 10  # the out-of-line code belongs to the tile loop
    assert epilogue["int64_compares_all_paths"] == 1 and epilogue["int64_compares_shortest_path"] == 0
    assert epilogue["per_score_shortest_path"] == 3.0 and epilogue["nested_loops"] == 0


def test_a_64_bit_loop_counter_is_not_a_per_score_compare():
    """LLVM may widen the tile loop's counter to 64 bits: its exit test runs once per tile and is not counted; a
    64-bit compare on the scores' path still is."""
    listing = sass(
        "MOV R1, RZ",                               # 0x00  tile loop header
        "HMMA.16816.F32 R4, R8, R12, R4",           # 0x10  main loop
        "@P0 BRA 0x10",                             # 0x20
        "ISETP.GE.U32.AND P1, PT, R4, R5, PT",      # 0x30  a 64-bit compare of values: counted
        "ISETP.GE.AND.EX P1, PT, R6, R7, PT, P1",   # 0x40
        "ISETP.NE.U32.AND P0, PT, R2, UR4, PT",     # 0x50  the loop counter's exit test: not counted
        "ISETP.NE.U32.AND.EX P0, PT, RZ, UR5, PT, P0",  # 0x60
        "@!P0 BRA 0x90",                            # 0x70  leaves the tile loop
        "BRA 0x0",                                  # 0x80  tile loop latch
        "EXIT",                                     # 0x90
    )
    epilogue = static_report.loop_summary(static_report.parse_sass(listing)["kernel"], scores_per_thread=1)["epilogue"]
    assert epilogue["int64_compares_all_paths"] == 2 and epilogue["int64_compares_shortest_path"] == 1


def test_ptxas_log_and_cuda_declarations_parse():
    stats = static_report.parse_ptxas_log(
        "ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90a'\n"
        "ptxas info    : Function properties for _Z1kPf\n"
        "    8 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 360 bytes cmem[0]\n")
    assert stats["_Z1kPf"] == {"registers": 255, "spill_stores": 16, "spill_loads": 12, "stack": 8,
                               "static_shared": 1024}
    declared = static_report.parse_cuda_expectations(
        "// Scores a tile.\n"
        "// sm90-expect: tensor_cores=HMMA async_copy=yes scores_per_thread=16\n"
        "// sm90-expect(<float): tensor_cores=none\n"
        "// sm90-known: async_copy: single-buffered\n"
        "template <typename T>\n"
        "__global__ void __launch_bounds__(256, 2)\n"
        "    tile_kernel(const T* x) {}\n"
        "__global__ void bare_kernel() {}\n")
    assert declared["bare_kernel"] == []
    half, scores = static_report.cuda_expectation(declared["tile_kernel"], "void tile_kernel<__half>(__half const*)")
    assert (half.tensor_cores, half.async_copy, dict(half.known), scores) == (
        "HMMA", True, {"async_copy": "single-buffered"}, 16)
    single, _ = static_report.cuda_expectation(declared["tile_kernel"], "void tile_kernel<float>(float const*)")
    assert single.tensor_cores is None and single.async_copy
