"""The protocol on a lent accelerator, in one command: ``scripts/device-protocol.sh OUT [SIZE]``.

The accelerator machine has Python, torch, numpy and tqdm and no package index; only the
working tree travels, one command may run 10 minutes and at most 8 files of at most 16 MiB come
back. So this entry point

1. checks the device (a CUDA GPU for ``gpu``; ``tiny`` and ``cpu`` run anywhere),
2. runs :func:`latentsel.policy.protocol.run_protocol` under a hard wall-clock budget (the
   training stages sized from measured step times and stopped at their deadlines),
3. packs the outputs into at most 8 files under ``OUT``: ``protocol.tar.gz`` (runs, metrics,
   evaluation, corpora, protocol.json: everything but the weights), ``policies.tar.partNN`` (the
   final weights, split into parts of at most 15 MiB; ``cat policies.tar.part* > policies.tar``)
   and ``MANIFEST.json`` (every file with its size and SHA-256, and what was left out).

It imports only the standard library, torch, numpy, tqdm and this package's policy code.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

__all__ = ["main", "pack"]

MAX_FILES = 8
PART_BYTES = 15 * 2**20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tar(paths: list[Path], root: Path, dst: Path, gz: bool) -> None:
    with tarfile.open(dst, "w:gz" if gz else "w", format=tarfile.PAX_FORMAT) as tar:
        for p in sorted(paths):
            info = tar.gettarinfo(p, arcname=str(p.relative_to(root)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with open(p, "rb") as f:
                tar.addfile(info, f)


def pack(work: str | Path, out: str | Path, *, max_files: int = MAX_FILES, part_bytes: int = PART_BYTES) -> dict:
    """Pack the protocol folder ``work`` into at most ``max_files`` files under ``out``; returns
    the manifest (also written as ``out/MANIFEST.json``).

    Training checkpoints (``*/checkpoint.pt``, which carry optimizer state) are left out: the
    exported ``policies/*.pt`` hold the final weights. When the weights need more parts than
    the file limit leaves, they are left out and the manifest says so.
    """
    work, out = Path(work), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise ValueError(f"{out}: not empty; the packed files must be all it holds")
    files = [p for p in work.rglob("*") if p.is_file() and not p.is_symlink()]
    weights = [p for p in files if p.parent.name == "policies" and p.name.endswith((".pt", ".pt.gz"))]
    skipped = [p for p in files if p.name == "checkpoint.pt" or p.name.startswith(".")]
    small = [p for p in files if p not in weights and p not in skipped]
    manifest: dict = {"files": {}, "left_out": [str(p.relative_to(work)) for p in sorted(skipped)]}
    _tar(small, work, out / "protocol.tar.gz", gz=True)
    if (out / "protocol.tar.gz").stat().st_size > part_bytes:
        raise RuntimeError(f"{out / 'protocol.tar.gz'}: {(out / 'protocol.tar.gz').stat().st_size} bytes, "
                           f"more than the {part_bytes} a file may have")
    if weights:
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            whole = Path(tmp) / "policies.tar"
            _tar(weights, work, whole, gz=False)
            n_parts = -(-whole.stat().st_size // part_bytes)
            if n_parts > max_files - 2:  # protocol.tar.gz and MANIFEST.json come back too
                manifest["left_out"] += [str(p.relative_to(work)) for p in weights]
                manifest["weights"] = f"{whole.stat().st_size} bytes need {n_parts} parts; left out"
            else:
                manifest["weights"] = {"join": "cat policies.tar.part* > policies.tar", "sha256": _sha256(whole),
                                       "bytes": whole.stat().st_size}
                with open(whole, "rb") as f:
                    for i in range(n_parts):
                        (out / f"policies.tar.part{i:02d}").write_bytes(f.read(part_bytes))
    for p in sorted(out.iterdir()):
        if p.is_file() and p.name != "MANIFEST.json":
            manifest["files"][p.name] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    buf = io.StringIO()
    json.dump(manifest, buf, indent=1)
    (out / "MANIFEST.json").write_text(buf.getvalue())
    if len(manifest["files"]) + 1 > max_files:
        raise RuntimeError(f"{out}: {len(manifest['files']) + 1} files packed, at most {max_files} come back")
    return manifest


def main(argv=None) -> int:
    # torch loads after the arguments are read, so that --help and usage errors are immediate
    from latentsel.policy.protocol import SIZES

    p = argparse.ArgumentParser(prog="device-protocol", description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder for the packed outputs (at most 8 files)")
    p.add_argument("--size", default="gpu", choices=list(SIZES), help="protocol size (default: %(default)s)")
    p.add_argument("--budget", type=float, default=480.0,
                   help="wall-clock seconds for the whole command, packing included (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    args = p.parse_args(argv)
    t0 = time.monotonic()

    import torch  # see above

    from latentsel.policy.protocol import run_protocol  # see above

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device-protocol: python {sys.version.split()[0]}, torch {torch.__version__}, device {name}, "
          f"size {args.size}, budget {args.budget:.0f} s", flush=True)
    if args.size == "gpu" and not cuda:
        print("device-protocol: size gpu needs a CUDA device and none is visible", file=sys.stderr)
        return 2
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    reserve = max(5.0, 0.06 * args.budget)  # packing and the interpreter's exit
    with tempfile.TemporaryDirectory(prefix="device-protocol-") as work:
        record = run_protocol(work, size=args.size, seed=args.seed, progress=False,
                              budget_s=args.budget - reserve - (time.monotonic() - t0))
        record["command_wall_s"] = time.monotonic() - t0
        Path(work, "protocol.json").write_text(json.dumps(record, indent=1))
        manifest = pack(work, args.out)
    for stage, st in record["stages"].items():
        tf = st.get("teacher_forced") or {}
        print(f"{stage}: {st['steps_run']} steps in {st['wall_s']:.0f} s, {st['tokens_per_s'] or 0:.0f} tokens/s"
              + (f", MFU {st['mfu']:.1%}" if st.get("mfu") else "")
              + (f", teacher-forced per step {tf['step']['acc']:.1%}" if tf else ""))
    for policy, splits in record["evaluation"].items():
        print(f"{policy}: " + ", ".join(f"{sp} {100 * c['accuracy']:.1f}%" for sp, c in splits.items()))
    print(f"device-protocol: done in {time.monotonic() - t0:.0f} s; {len(manifest['files']) + 1} files in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
