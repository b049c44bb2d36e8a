#!/usr/bin/env python3
"""Compiles sd-core's CUDA kernel sources with NVRTC (through ctypes) for the given architectures.

No GPU and no CUDA toolkit are needed, only libnvrtc (the `nvidia-cuda-nvrtc` wheel). For every
source and architecture it compiles the whole module the way sd-core does at run time (plus
`-Xptxas -v` to get register and spill counts), checks that every kernel named in the source's
FA_KERNEL table (or declared `extern "C" __global__`) is in the result, and prints one line per kernel. Exit code 1 on any failure.

    python3 scripts/ci/nvrtc_compile.py --nvrtc /path/to/libnvrtc.so.13 --arch sm_80 --arch sm_90 \
        [--variant=-DSD_FA_ONLY_F16 --variant=-DSD_FA_ONLY_BF16] sd-core/src/attention/kernels/flash_attn.cu
"""

import argparse
import ctypes
import re
import sys
import time


def load_nvrtc(path):
    lib = ctypes.CDLL(path)
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def check(lib, res, what):
    if res != 0:
        raise RuntimeError(f"{what}: {lib.nvrtcGetErrorString(res).decode()}")


def compile_module(lib, src, name, options):
    """Returns (ok, log, cubin_size, ptx)."""
    prog = ctypes.c_void_p()
    check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None),
          "nvrtcCreateProgram")
    try:
        opts = [o.encode() for o in options]
        arr = (ctypes.c_char_p * len(opts))(*opts)
        res = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        check(lib, lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
        buf = ctypes.create_string_buffer(size.value)
        check(lib, lib.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
        log = buf.value.decode(errors="replace")
        if res != 0:
            return False, log, 0, ""
        check(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin_size = size.value
        check(lib, lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
        buf = ctypes.create_string_buffer(size.value)
        check(lib, lib.nvrtcGetPTX(prog, buf), "nvrtcGetPTX")
        return True, log, cubin_size, buf.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def expected_kernels(src):
    """The kernel names: the FA_KERNEL(...) instantiation table and plain extern "C" kernels."""
    names = re.findall(r"^FA_KERNEL\((\w+),", src, flags=re.M)
    names += re.findall(r'^extern "C" __global__ void(?: __launch_bounds__\([^)]*\))? (\w+)\(', src, flags=re.M)
    return names


def ptxas_info(log):
    """Per-kernel register / spill / shared-memory info from the `-Xptxas -v` log."""
    info = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = m.group(1)
            info[current] = {}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            info[current].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            info[current]["regs"] = int(m.group(1))
    return info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nvrtc", required=True, help="path of libnvrtc.so.*")
    ap.add_argument("--arch", action="append", required=True, help="sm_80, sm_90, ...")
    ap.add_argument("--variant", action="append", default=None,
                    help="extra NVRTC options of one compile, e.g. -DSD_FA_ONLY_F16 (repeatable; "
                         "each source is compiled once per variant; default: one plain compile)")
    ap.add_argument("sources", nargs="+")
    args = ap.parse_args()

    lib = load_nvrtc(args.nvrtc)
    major, minor = ctypes.c_int(), ctypes.c_int()
    check(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    print(f"NVRTC {major.value}.{minor.value} ({args.nvrtc})")

    failures = 0
    for path in args.sources:
        with open(path) as f:
            src = f.read()
        names = expected_kernels(src)
        if not names:
            print(f"FAIL {path}: no kernels found")
            failures += 1
            continue
        variants = args.variant or [""]
        for arch in args.arch:
            seen = set()
            for variant in variants:
                # The options sd-core uses at run time (cuda.rs), plus the ptxas report.
                options = [f"--gpu-architecture={arch}", "--std=c++17", "-Xptxas", "-v"] + variant.split()
                label = f"{path} [{arch}{' ' + variant if variant else ''}]"
                started = time.time()
                ok, log, cubin_size, ptx = compile_module(lib, src, path.rsplit("/", 1)[-1], options)
                secs = time.time() - started
                if not ok:
                    print(f"FAIL {label}: NVRTC compile error after {secs:.1f} s:\n{log}")
                    failures += 1
                    continue
                entries = set(re.findall(r"^\.(?:visible )?\.?entry (\w+)", ptx, flags=re.M))
                info = ptxas_info(log)
                print(f"{label}: compiled in {secs:.1f} s, cubin {cubin_size} bytes")
                for name in names:
                    if name not in entries or name in seen:
                        continue
                    seen.add(name)
                    i = info.get(name, {})
                    spills = i.get("spill_st", 0) + i.get("spill_ld", 0)
                    note = f"  (spills {i.get('spill_st')}/{i.get('spill_ld')} bytes st/ld)" if spills else ""
                    print(f"  ok   {name:28} {arch}  regs {i.get('regs', '?'):>3}  stack {i.get('stack', '?')}{note}")
                for w in [l for l in log.splitlines() if "warning" in l.lower()]:
                    print(f"  warning: {w}")
            for name in names:
                if name not in seen:
                    print(f"  FAIL {name}: not in any compiled module for {arch}")
                    failures += 1
    if failures:
        print(f"{failures} kernel compile failure(s)")
        return 1
    print("all kernels compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
