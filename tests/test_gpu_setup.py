"""Contract of tools/gpu_setup/te_wheels.py on CPU, no network: pinned downloads verified, files cut into per-call
folders under the size limit and joined back bit-exactly on the other side, every step idempotent, bad bytes named.
(The TE build and check need the GPU machine.)"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "gpu_setup"))
import te_wheels  # noqa: E402
from te_wheels import Pinned, SetupError  # noqa: E402


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files(folder: Path, sizes: dict[str, int], seed: int = 0) -> dict[Path, bytes]:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, size in sizes.items():
        made[folder / name] = data = rng.randbytes(size)
        (folder / name).write_bytes(data)
    return made


def test_the_lock_pins_the_te_files():
    pinned = {p.requirement.split("==")[0]: p for p in te_wheels.read_lock()}
    assert {"transformer-engine", "transformer-engine-cu13", "transformer-engine-torch"} <= set(pinned)
    assert pinned["transformer-engine-torch"].is_sdist and not pinned["transformer-engine-cu13"].is_sdist
    assert all(p.requirement.split("==")[1] == "2.20.2" for p in pinned.values() if p.requirement.startswith("transformer-engine"))


def test_a_bad_lock_line_is_named(tmp_path):
    (tmp_path / "lock").write_text("# comment\nfoo==1 foo-1.whl abc\n")
    with pytest.raises(SetupError, match=r"lock:2: expected 'requirement filename sha256'"):
        te_wheels.read_lock(tmp_path / "lock")


def test_fetch_verifies_and_skips_what_it_has(tmp_path):
    content = {"a-1.whl": b"wheel a", "b-2.tar.gz": b"sdist b"}
    pinned = [Pinned(f"{n.split('-')[0]}=={n.split('-')[1][0]}", n, _digest(c)) for n, c in content.items()]
    calls = []

    def download(item: Pinned, dest: Path) -> None:
        calls.append(item.filename)
        (dest / item.filename).write_bytes(content[item.filename])

    files = tmp_path / "files"
    assert te_wheels.fetch(files, pinned, download) == ["a-1.whl", "b-2.tar.gz"]
    assert te_wheels.fetch(files, pinned, download) == []  # idempotent: nothing downloaded again
    (files / "a-1.whl").write_bytes(b"truncated")  # a broken earlier try is replaced
    assert te_wheels.fetch(files, pinned, download) == ["a-1.whl"]
    assert (files / "a-1.whl").read_bytes() == b"wheel a"

    content["b-2.tar.gz"] = b"tampered"
    (files / "b-2.tar.gz").unlink()
    with pytest.raises(SetupError, match=r"b-2.tar.gz: sha256 .* wheels.lock pins"):
        te_wheels.fetch(files, pinned, download)
    assert not (files / "b-2.tar.gz").exists()  # nothing unverified is kept


def test_plan_and_receive_round_trip(tmp_path):
    call_bytes = 64 * 1024 + 1000  # 1000 bytes of payload per call
    made = _files(tmp_path / "here", {"big.whl": 2600, "small.whl": 10, "mid.tar.gz": 700, "exact.whl": 1000})
    wanted = {path: _digest(data) for path, data in made.items()}
    calls_dir = tmp_path / "calls"
    n = te_wheels.plan(wanted, calls_dir, call_bytes)
    assert n == 5  # 4310 bytes in calls of 1000
    for folder in calls_dir.iterdir():
        payload = sum(f.stat().st_size for f in folder.iterdir() if f.name != te_wheels.MANIFEST)
        assert 0 < payload <= 1000 and sum(f.stat().st_size for f in folder.iterdir()) < call_bytes
    manifest = json.loads((calls_dir / "1" / te_wheels.MANIFEST).read_text())
    assert len(manifest["files"]["big.whl"]["pieces"]) >= 3

    stamp = (calls_dir / "1" / te_wheels.MANIFEST).stat().st_mtime_ns
    assert te_wheels.plan(wanted, calls_dir, call_bytes) == 5  # same plan: nothing rewritten
    assert (calls_dir / "1" / te_wheels.MANIFEST).stat().st_mtime_ns == stamp

    cache = tmp_path / "gpu"
    order = [3, 1, 5, 2, 4]  # any order works
    for i, call in enumerate(order):
        complete, needed = te_wheels.receive(calls_dir / str(call), cache)
        assert needed == sorted(order[i + 1 :])
    assert set(complete) == {p.name for p in made}
    for path, data in made.items():
        assert (cache / "files" / path.name).read_bytes() == data
    assert not any((cache / "pieces").iterdir())  # pieces removed once joined
    assert te_wheels.receive(calls_dir / "2", cache) == (sorted(p.name for p in made), [])  # idempotent


def test_a_corrupt_piece_names_its_call(tmp_path):
    made = _files(tmp_path / "here", {"big.whl": 2500})
    calls_dir = tmp_path / "calls"
    te_wheels.plan({p: _digest(d) for p, d in made.items()}, calls_dir, 64 * 1024 + 1000)
    piece = next((calls_dir / "2").glob("big.whl.part*"))
    piece.write_bytes(b"x" + piece.read_bytes()[1:])
    te_wheels.receive(calls_dir / "1", tmp_path / "gpu")
    with pytest.raises(SetupError, match=r"big.whl.part2of3: sha256 .* resend call 2"):
        te_wheels.receive(calls_dir / "2", tmp_path / "gpu")


def test_plan_refuses_missing_files_and_install_names_missing_calls(tmp_path):
    with pytest.raises(SetupError, match=r"missing .*nope.whl.*te_wheels.py fetch"):
        te_wheels.plan({tmp_path / "nope.whl": "0" * 64}, tmp_path / "calls")
    made = _files(tmp_path / "here", {"w-1-py3-none-any.whl": 1500})
    te_wheels.plan({p: _digest(d) for p, d in made.items()}, tmp_path / "calls", 64 * 1024 + 1000)
    te_wheels.receive(tmp_path / "calls" / "1", tmp_path / "gpu")
    pinned = [Pinned("w==1", "w-1-py3-none-any.whl", _digest(next(iter(made.values()))))]
    with pytest.raises(SetupError, match=r"not received yet: \['w-1-py3-none-any.whl'\]; .* calls \[1, 2\]"):
        te_wheels.install(tmp_path / "gpu", pinned)


def _wheel(path: Path, name: str, files: dict[str, str]) -> Path:
    """A minimal valid pure-Python wheel."""
    dist = f"{name}-1.0.dist-info"
    contents = files | {
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{k},,\n" for k in contents) + f"{dist}/RECORD,,\n"
    wheel = path / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for k, v in (contents | {f"{dist}/RECORD": record}).items():
            z.writestr(k, v)
    return wheel


def test_install_merges_wheels_sharing_a_package_and_is_idempotent(tmp_path):
    # TE's three wheels all fill `transformer_engine/`: separate --target installs would overwrite each other.
    cache = tmp_path / "gpu"
    (cache / "files").mkdir(parents=True)
    wheels = [_wheel(cache / "files", "shared_core", {"shared/__init__.py": "", "shared/core.py": "X = 1\n"}),
              _wheel(cache / "files", "shared_ext", {"shared/ext.py": "Y = 2\n"})]
    pinned = [Pinned(f"{w.name.split('-')[0]}==1.0", w.name, _digest(w.read_bytes())) for w in wheels]
    pinned.append(Pinned("some-sdist==1.0", "some_sdist-1.0.tar.gz", "0" * 64))  # sdists are built, not installed
    assert te_wheels.install(cache, pinned) is True
    site = te_wheels.site_dir(cache)
    assert (site / "shared" / "core.py").is_file() and (site / "shared" / "ext.py").is_file()
    assert te_wheels.install(cache, pinned) is False  # same set: skipped
    built = _wheel(cache / "files", te_wheels.BUILT_TAG, {"transformer_engine_torch.py": ""})  # carried back
    assert te_wheels.built_extension(cache) == [built]
    assert te_wheels.install(cache, pinned) is True and (site / "transformer_engine_torch.py").is_file()


def test_built_wheel_comes_back_in_pieces_and_is_collected(tmp_path, monkeypatch):
    wheel = tmp_path / "built" / f"{te_wheels.BUILT_TAG}-2.20.2-cp312-cp312-linux_x86_64.whl"
    wheel.parent.mkdir()
    data = random.Random(1).randbytes(2500)
    wheel.write_bytes(data)
    out = tmp_path / "out"
    meta = {"sha256": _digest(data), "torch": "2.11.0+cu130", "pieces": te_wheels.split_out(wheel, out, 1000)}
    (out / (wheel.name + ".json")).write_text(json.dumps(meta))
    assert len(meta["pieces"]) == 3 and all((out / p).stat().st_size <= 1000 for p in meta["pieces"])

    local = tmp_path / "local"
    assert te_wheels.collect(out, local / "built") == wheel.name
    assert (local / "built" / wheel.name).read_bytes() == data
    assert te_wheels.collect(out, local / "built") == wheel.name  # idempotent
    # The next plan carries it beside the pinned downloads.
    carried = te_wheels.carried_files(local, pinned=[])
    assert carried == {local / "built" / wheel.name: _digest(data)}

    (out / meta["pieces"][1]).write_bytes(b"broken")
    (local / "built" / wheel.name).unlink()
    with pytest.raises(SetupError, match="joined sha256 .* expected"):
        te_wheels.collect(out, local / "built")
    assert not (local / "built" / wheel.name).exists()


def test_plan_keeps_calls_under_60_mib_by_default():
    assert te_wheels.CALL_BYTES < 60 * te_wheels.MiB and te_wheels.OUT_PIECE_BYTES < 16 * te_wheels.MiB
    with pytest.raises(SystemExit, match="must be below 60"):
        te_wheels.main(["plan", "--call-mib", "63"])
