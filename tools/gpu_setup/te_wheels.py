"""Transformer Engine on a GPU machine without network: fetch here, carry in pieces, reassemble, install, build, check.

Here (where PyPI is reachable), from the repo root:

    python tools/gpu_setup/te_wheels.py fetch      # download the files of wheels.lock into .gpu_wheels/files, verified
    python tools/gpu_setup/te_wheels.py plan       # cut them into per-call folders .gpu_wheels/calls/N (< 60 MiB)

On the GPU machine, one device call per folder, back to back while it stays warm (it keeps /tmp between calls):

    python3 tools/gpu_setup/te_wheels.py receive .gpu_wheels/calls/N   # verify + stash pieces, join finished files
    python3 tools/gpu_setup/te_wheels.py install   # all wheels into one --target folder (PYTHONPATH), idempotent
    python3 tools/gpu_setup/te_wheels.py build     # transformer-engine-torch from its sdist, wheel copied to $OUT
    python3 tools/gpu_setup/te_wheels.py check     # TE imports, FP8 recipes available, the `te` spec builds and runs

Back here, with the built wheel the device returned:

    python tools/gpu_setup/te_wheels.py collect DIR   # join + verify it into .gpu_wheels/built; later plans carry it

Every step skips work already done (verified by sha256) and stops with an error that names the file and what to run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

MiB = 2**20
REPO = Path(__file__).resolve().parents[2]
LOCK = Path(__file__).resolve().with_name("wheels.lock")
LOCAL = REPO / ".gpu_wheels"  # ignored by git: downloads, built wheels and the per-call folders
CACHE = Path(os.environ.get("BDGEMMA_GPU_CACHE", "/tmp/bdgemma_gpu"))  # on the GPU machine, outside the tree
CALL_BYTES = 59 * MiB  # one device call carries at most 64 MiB with the working tree (about 1 MiB)
OUT_PIECE_BYTES = 15 * MiB  # files returned from $OUT must be under 16 MiB each
MANIFEST = "manifest.json"
BUILT_TAG = "transformer_engine_torch"
BINARY_FLAGS = [
    "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
    *[f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                                  "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")],
]


class SetupError(RuntimeError):
    """A step cannot go on; the message says which file and what to run."""


@dataclass(frozen=True)
class Pinned:
    requirement: str
    filename: str
    sha256: str

    @property
    def is_sdist(self) -> bool:
        return self.filename.endswith(".tar.gz")


def read_lock(path: Path = LOCK) -> list[Pinned]:
    """The pinned files: one `requirement filename sha256` per line, `#` comments."""
    pinned = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3 or len(parts[2]) != 64:
            raise SetupError(f"{path}:{number}: expected 'requirement filename sha256', got {line!r}")
        pinned.append(Pinned(*parts))
    return pinned


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def verified(path: Path, expected: str) -> bool:
    """True if `path` exists with this sha256 (a file with another hash is removed: it is a broken earlier try)."""
    if not path.is_file():
        return False
    if sha256(path) == expected:
        return True
    path.unlink()
    return False


# ---- here: fetch, plan, collect ------------------------------------------------------------------------------


def pip_download(pinned: Pinned, dest: Path) -> None:
    """`pip download --no-deps` of one pinned file (wheels for the GPU machine's Python 3.12 / x86-64)."""
    flags = ["--no-binary=:all:", "--no-build-isolation"] if pinned.is_sdist else BINARY_FLAGS
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), *flags, pinned.requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise SetupError(f"pip download {pinned.requirement} failed:\n{result.stderr[-2000:]}")


def fetch(files: Path, pinned: list[Pinned], download: Callable[[Pinned, Path], None] = pip_download) -> list[str]:
    """Download every pinned file not yet in `files` with its hash → names downloaded now."""
    files.mkdir(parents=True, exist_ok=True)
    fetched = []
    for item in pinned:
        target = files / item.filename
        if verified(target, item.sha256):
            continue
        with tempfile.TemporaryDirectory(dir=files) as tmp:
            download(item, Path(tmp))
            got = Path(tmp) / item.filename
            if not got.is_file():
                raise SetupError(f"{item.requirement}: expected {item.filename}, pip saved {sorted(os.listdir(tmp))}")
            digest = sha256(got)
            if digest != item.sha256:
                raise SetupError(f"{item.filename}: sha256 {digest}, wheels.lock pins {item.sha256}")
            got.replace(target)
        fetched.append(item.filename)
    return fetched


def carried_files(local: Path = LOCAL, pinned: list[Pinned] | None = None) -> dict[Path, str]:
    """{path: sha256}: the pinned downloads plus the torch extension built on the GPU machine, once collected."""
    pinned = read_lock() if pinned is None else pinned
    wanted = {local / "files" / p.filename: p.sha256 for p in pinned}
    for wheel in sorted((local / "built").glob(f"{BUILT_TAG}-*.whl")):
        wanted[wheel] = json.loads(wheel.with_name(wheel.name + ".json").read_text())["sha256"]
    return wanted


def plan(wanted: dict[Path, str], calls: Path, call_bytes: int = CALL_BYTES) -> int:
    """Cut the files of `wanted` ({path: sha256}) into folders `calls/1..n` of at most `call_bytes` each.

    The files are laid end to end (smallest first) and the stream cut every `call_bytes`: a file that straddles a
    cut travels as pieces `<name>.partIofN`. Every folder holds the same `manifest.json` (each file's size and
    sha256, each piece's offset, size, sha256 and call), so any call can verify and join what it completes.
    Returns the number of calls. Skips the work if the folders already hold this exact plan.
    """
    budget = call_bytes - 64 * 1024  # room for the manifest
    missing = [str(path) for path in wanted if not path.is_file()]
    if missing:
        raise SetupError(f"missing {missing}; run `te_wheels.py fetch` (or `collect` for a built wheel)")
    order = sorted(wanted, key=lambda path: (path.stat().st_size, path.name))
    key = {"call_bytes": call_bytes, "files": {path.name: wanted[path] for path in order}}
    done = calls / "1" / MANIFEST
    if done.is_file() and json.loads(done.read_text()).get("key") == key:
        return json.loads(done.read_text())["calls"]

    entries, layout, call, room = {}, [], 1, budget
    for path in order:
        size, offset, pieces = path.stat().st_size, 0, []
        while offset < size or not pieces:
            if room == 0:
                call, room = call + 1, budget
            take = min(room, size - offset)
            pieces.append({"offset": offset, "size": take, "call": call})
            offset, room = offset + take, room - take
        for i, piece in enumerate(pieces, 1):
            piece["name"] = path.name if len(pieces) == 1 else f"{path.name}.part{i}of{len(pieces)}"
            layout.append((path, piece))
        entries[path.name] = {"size": size, "sha256": wanted[path], "pieces": pieces}

    if calls.exists():
        shutil.rmtree(calls)
    for path, piece in layout:
        folder = calls / str(piece["call"])
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / piece["name"]
        if piece["name"] == path.name:
            os.link(path, target)  # whole file: a hard link, no copy
        else:
            with path.open("rb") as src, target.open("wb") as dst:
                src.seek(piece["offset"])
                dst.write(src.read(piece["size"]))
        piece["sha256"] = sha256(target)
    manifest = json.dumps({"key": key, "calls": call, "files": entries}, indent=1)
    for n in range(1, call + 1):
        (calls / str(n) / MANIFEST).write_text(manifest)
    return call


def collect(source: Path, built: Path) -> str:
    """Join a built wheel returned from the GPU machine (pieces + `<wheel>.json`) into `built`, verified."""
    sidecars = sorted(source.glob(f"{BUILT_TAG}-*.whl.json"))
    if len(sidecars) != 1:
        raise SetupError(f"{source}: expected one {BUILT_TAG}-*.whl.json from `te_wheels.py build`, found {sidecars}")
    meta = json.loads(sidecars[0].read_text())
    name = sidecars[0].name[: -len(".json")]
    built.mkdir(parents=True, exist_ok=True)
    target = built / name
    if not verified(target, meta["sha256"]):
        join([source / piece for piece in meta["pieces"]], target, meta["sha256"])
        (built / sidecars[0].name).write_text(json.dumps(meta))
    return name


# ---- there: receive, install, build, check -------------------------------------------------------------------


def join(pieces: list[Path], target: Path, expected: str) -> None:
    """Concatenate `pieces` into `target` and verify its sha256 (nothing is left behind on a mismatch)."""
    missing = [str(p) for p in pieces if not p.is_file()]
    if missing:
        raise SetupError(f"cannot join {target.name}: missing {missing}")
    partial = target.with_name(target.name + ".joining")
    with partial.open("wb") as dst:
        for piece in pieces:
            with piece.open("rb") as src:
                shutil.copyfileobj(src, dst, 8 * MiB)
    digest = sha256(partial)
    if digest != expected:
        partial.unlink()
        raise SetupError(f"{target.name}: joined sha256 {digest}, expected {expected}; re-run `plan` here and resend")
    partial.replace(target)


def receive(call_dir: Path, cache: Path = CACHE) -> tuple[list[str], list[int]]:
    """Stash the verified pieces of one call folder in `cache`, join every file now complete.

    Returns (files complete in the cache, calls still needed).
    """
    manifest_path = call_dir / MANIFEST
    if not manifest_path.is_file():
        raise SetupError(f"{manifest_path} not found: run `te_wheels.py plan` here and carry {call_dir} in the call")
    manifest = json.loads(manifest_path.read_text())
    files, pieces_dir = cache / "files", cache / "pieces"
    files.mkdir(parents=True, exist_ok=True)
    pieces_dir.mkdir(parents=True, exist_ok=True)
    (cache / MANIFEST).write_text(manifest_path.read_text())
    complete, needed = [], set()
    for name, entry in manifest["files"].items():
        if verified(files / name, entry["sha256"]):
            complete.append(name)
            continue
        single = len(entry["pieces"]) == 1
        for piece in entry["pieces"]:
            stash = (files / name) if single else (pieces_dir / piece["name"])
            if verified(stash, entry["sha256"] if single else piece["sha256"]):
                continue
            carried = call_dir / piece["name"]
            if not carried.is_file():
                needed.add(piece["call"])
                continue
            digest = sha256(carried)
            if digest != piece["sha256"]:
                raise SetupError(f"{carried}: sha256 {digest}, manifest says {piece['sha256']}; resend call {piece['call']}")
            shutil.copyfile(carried, stash)
        if single:
            if (files / name).is_file():
                complete.append(name)
            continue
        stashed = [pieces_dir / piece["name"] for piece in entry["pieces"]]
        if all(p.is_file() for p in stashed):
            join(stashed, files / name, entry["sha256"])
            for p in stashed:
                p.unlink()
            complete.append(name)
    return sorted(complete), sorted(needed)


def site_dir(cache: Path) -> Path:
    return cache / "site"


def built_extension(cache: Path) -> list[Path]:
    """The transformer-engine-torch wheel, built here (`cache/built`) or carried from an earlier build (`files`)."""
    return sorted((cache / "built").glob(f"{BUILT_TAG}-*.whl"))[:1] or sorted((cache / "files").glob(f"{BUILT_TAG}-*.whl"))[:1]


def install(cache: Path = CACHE, pinned: list[Pinned] | None = None) -> bool:
    """Install every pinned wheel (and the built torch extension, if any) into `cache/site` in one pip call.

    One call, into a fresh folder: the TE wheels share the `transformer_engine` package folder, which separate
    `--target` installs would overwrite. Returns False if the same set is installed already.
    """
    pinned = read_lock() if pinned is None else pinned
    files = cache / "files"
    missing = [p.filename for p in pinned if not p.is_sdist and not (files / p.filename).is_file()]
    if missing:
        needed = _calls_for(cache, missing)
        raise SetupError(f"not received yet: {missing}; run `receive` with the folders of calls {needed}")
    wheels = [files / p.filename for p in pinned if not p.is_sdist] + built_extension(cache)
    site = site_dir(cache)
    marker = site / ".installed"
    want = "\n".join(sorted(w.name for w in wheels))
    if marker.is_file() and marker.read_text() == want:
        return False
    if site.exists():
        shutil.rmtree(site)
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--target", str(site), *map(str, wheels)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise SetupError(f"pip install into {site} failed:\n{result.stderr[-3000:]}")
    marker.write_text(want)
    return True


def _calls_for(cache: Path, names: Iterable[str]) -> list[int]:
    manifest = cache / MANIFEST
    if not manifest.is_file():
        return []
    entries = json.loads(manifest.read_text())["files"]
    return sorted({p["call"] for n in names if n in entries for p in entries[n]["pieces"]})


def _include_dirs(site: Path) -> list[str]:
    """Header folders for the extension build: CUDA's wheels' (cudnn.h, nccl.h) and cudnn-frontend's."""
    roots = [site / "include"]
    try:
        import nvidia  # the image's CUDA wheels, a namespace package

        roots += [d / "include" for base in nvidia.__path__ for d in Path(base).iterdir()]
        roots += [d / "include" for base in nvidia.__path__ for d in Path(base).glob("*/*")]
    except ImportError:
        pass
    return [str(d) for d in roots if d.is_dir()]


def build(cache: Path = CACHE, out: Path | None = None, pinned: list[Pinned] | None = None) -> Path:
    """Build transformer-engine-torch from its sdist against this machine's torch (C++ only, all cores).

    The wheel goes to `cache/built` with a sidecar (sha256, torch version) and, in pieces under 16 MiB, to `out`
    ($OUT) so it can be collected here and carried next time. Skips the build if a wheel for this torch exists.
    """
    import torch

    pinned = read_lock() if pinned is None else pinned
    sdist = next(p for p in pinned if p.is_sdist and p.filename.startswith(BUILT_TAG))
    built = cache / "built"
    for wheel in sorted(built.glob(f"{BUILT_TAG}-*.whl")):
        if json.loads(wheel.with_name(wheel.name + ".json").read_text())["torch"] == torch.__version__:
            install(cache, pinned)
            return wheel
        wheel.unlink()  # built for another torch
    if carried := built_extension(cache):  # built on this image before, collected and carried back
        install(cache, pinned)
        return carried[0]
    source = cache / "files" / sdist.filename
    if not verified(source, sdist.sha256):
        raise SetupError(f"{source} not received yet; run `receive` with the folders of calls "
                         f"{_calls_for(cache, [sdist.filename])}")
    install(cache, pinned)  # cudnn-frontend's headers come from the installed wheel
    env = dict(os.environ, NVTE_PYTORCH_FORCE_BUILD="TRUE", MAX_JOBS=str(os.cpu_count() or 8),
               CPATH=os.pathsep.join([*_include_dirs(site_dir(cache)), os.environ.get("CPATH", "")]))
    log = cache / "build.log"
    with tempfile.TemporaryDirectory() as tmp, log.open("w") as out_log:
        command = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "--no-index",
                   "-w", tmp, str(source)]
        result = subprocess.run(command, env=env, stdout=out_log, stderr=subprocess.STDOUT)
        if result.returncode:
            tail = log.read_text().splitlines()[-60:]
            raise SetupError(f"building {sdist.filename} failed (full log {log}):\n" + "\n".join(tail))
        made = next(Path(tmp).glob(f"{BUILT_TAG}-*.whl"))
        built.mkdir(parents=True, exist_ok=True)
        wheel = built / made.name
        shutil.move(made, wheel)
    meta = {"sha256": sha256(wheel), "torch": torch.__version__, "pieces": []}
    if out is not None:
        meta["pieces"] = split_out(wheel, out)
        (out / (wheel.name + ".json")).write_text(json.dumps(meta))
    wheel.with_name(wheel.name + ".json").write_text(json.dumps(meta))
    install(cache, pinned)
    return wheel


def split_out(path: Path, out: Path, piece_bytes: int = OUT_PIECE_BYTES) -> list[str]:
    """Copy `path` into `out` as pieces `<name>.partI` of at most `piece_bytes` → their names."""
    out.mkdir(parents=True, exist_ok=True)
    names = []
    with path.open("rb") as src:
        while chunk := src.read(piece_bytes):
            names.append(f"{path.name}.part{len(names) + 1}")
            (out / names[-1]).write_bytes(chunk)
    return names


CHECK = r"""
import torch, transformer_engine, transformer_engine.pytorch as te
from importlib.metadata import version
print("torch", torch.__version__, "| transformer_engine", version("transformer_engine"),
      "| te torch extension", version("transformer_engine_torch"), "| device", torch.cuda.get_device_name())
for name in ("is_fp8_available", "is_fp8_block_scaling_available", "is_mxfp8_available"):
    print(name, getattr(te, name)())
from megatron_bdgemma.config import tiny
from megatron_bdgemma.model import BDGemmaModel
from megatron_bdgemma.runtime.distributed import ensure_model_parallel
ensure_model_parallel()
config = tiny(bf16=True, params_dtype=torch.bfloat16, use_cpu_initialization=False)  # as the trainer builds it
model = BDGemmaModel(config, backend="te").cuda()
kinds = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("TE")})
print("te spec modules:", ", ".join(kinds))
assert "TEGroupedMLP" in kinds, "the te spec built no TEGroupedMLP experts"
ids = torch.randint(2, config.vocab_size, (2, 32), device="cuda")
logits = model.encode(ids, return_logits=True).logits
assert torch.isfinite(logits).all(), "te spec logits are not finite"
print("te spec forward ok:", tuple(logits.shape))
"""


def check(cache: Path = CACHE) -> None:
    """Import TE from `cache/site`, print the FP8 recipes this card supports, build and run the `te` spec."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(site_dir(cache)), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, cwd=REPO)
    if result.returncode:
        raise SetupError("TE check failed (output above)")


def environment_line(cache: Path = CACHE) -> str:
    return f"export PYTHONPATH={REPO}:{site_dir(cache)}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=CACHE, help="stash on the GPU machine (default %(default)s)")
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("fetch", help="here: download the pinned files")
    p = sub.add_parser("plan", help="here: cut the files into per-call folders")
    p.add_argument("--call-mib", type=float, default=CALL_BYTES / MiB, help="MiB per device call (< 60)")
    p = sub.add_parser("receive", help="GPU machine: stash one call folder")
    p.add_argument("call_dir", type=Path)
    sub.add_parser("install", help="GPU machine: install the wheels into CACHE/site")
    sub.add_parser("build", help="GPU machine: build transformer-engine-torch, copy it to $OUT")
    sub.add_parser("check", help="GPU machine: import TE and run the te spec")
    p = sub.add_parser("collect", help="here: take the built wheel from the device's returned files")
    p.add_argument("source", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.step == "fetch":
            got = fetch(LOCAL / "files", read_lock())
            print(f"fetched {len(got)} file(s) into {LOCAL / 'files'}" + (f": {', '.join(got)}" if got else " (all present)"))
        elif args.step == "plan":
            if not 0 < args.call_mib < 60:
                raise SetupError(f"--call-mib {args.call_mib}: must be below 60 (64 MiB per call, tree included)")
            calls = plan(carried_files(), LOCAL / "calls", int(args.call_mib * MiB))
            print(f"{calls} device calls, back to back (each within 30 s of the last), one per folder:")
            for n in range(1, calls + 1):
                print(f"  carry ['.gpu_wheels/calls/{n}'], command: python3 tools/gpu_setup/te_wheels.py receive "
                      f".gpu_wheels/calls/{n}")
        elif args.step == "receive":
            complete, needed = receive(args.call_dir, args.cache)
            print(f"{len(complete)} file(s) complete in {args.cache / 'files'}; "
                  + (f"still needed: calls {needed}" if needed else "nothing more to receive"))
        elif args.step == "install":
            changed = install(args.cache)
            print(("installed into " if changed else "already installed in ") + str(site_dir(args.cache)))
            print(environment_line(args.cache))
        elif args.step == "build":
            out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
            wheel = build(args.cache, out)
            print(f"built {wheel}" + (f"; pieces in {out}: run `te_wheels.py collect <files_at>` here" if out else ""))
            print(environment_line(args.cache))
        elif args.step == "check":
            check(args.cache)
        elif args.step == "collect":
            name = collect(args.source, LOCAL / "built")
            print(f"{LOCAL / 'built' / name} verified; `plan` now carries it instead of building")
    except SetupError as error:
        sys.exit(f"te_wheels.py {args.step}: {error}")


if __name__ == "__main__":
    main()
