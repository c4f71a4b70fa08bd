"""The README as written: every command of its ```bash blocks runs on a fresh copy of the repository after
`make demo`, and its Python snippet runs.

The commands run in order (later ones use what earlier ones saved), in a temporary copy of `examples/`, `tools/`,
the README and the Makefile, with the worktree's package on `PYTHONPATH`. They run as written except that short
training overrides are appended (`key.value` overrides apply in order, so the last one wins), generation is capped
at a few tokens, `/path/to/...` placeholders point at a tiny HF DiffusionGemma (with a word-level tokenizer) built
here, and `python` / `torchrun` are this interpreter. `make test` is this suite; `make demo` runs its recipe from the
Makefile. Commands that need GPUs (`GPU_ONLY`) are only parsed: their run config must load.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
SHORT_TRAINING = ["train.steps=2", "optim.warmup_steps=1", "train.log_interval=1", "train.eval_interval=0"]
SHORT_GENERATION = ["--max-new-tokens", "8"]
GPU_ONLY = {"examples/configs/diffusiongemma_26b_sft.yaml": "8 GPUs with Transformer Engine (backend te, bf16, ep 8)"}
# The GPU-machine set-up downloads and builds Transformer Engine: here each of its steps is only checked to exist.
GPU_SETUP = "tools/gpu_setup/te_wheels.py"
# Messages of our dependencies that `megatron_bdgemma.runtime.log_filters` removes; none may reach a user.
NOISE = re.compile(r"Warning|warnings\.warn|DEPRECATED|deprecated|No CUDA runtime|is experimental")


def bash_commands(markdown: str) -> list[list[str]]:
    """Every command of the ```bash blocks (continuation lines joined, comments dropped, `a && b` split in two),
    split like the shell."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while "&&" in words:
                cut = words.index("&&")
                commands.append(words[:cut])
                words = words[cut + 1:]
            if words:
                commands.append(words)
    return commands


def makefile_recipe(target: str) -> list[list[str]]:
    """The commands of a Makefile target, with its `VAR := value` variables expanded."""
    text = (REPO / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+)\s*:?=\s*(.*)$", text, re.M))
    recipe = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", text, re.M).group(1)
    commands = []
    for line in recipe.splitlines():
        while "$(" in line:
            line = re.sub(r"\$\((\w+)\)", lambda m: variables[m.group(1)], line)
        commands.append(shlex.split(line))
    return commands


@pytest.fixture(scope="module")
def hf_diffusiongemma(tmp_path_factory) -> Path:
    """A tiny random HF DiffusionGemma with a word-level tokenizer beside it (what `/path/to/...` stands for)."""
    from tests import hf_models
    from tests.test_data import build_hf_tokenizer

    path = hf_models.save(hf_models.diffusion_gemma(canvas_length=4), tmp_path_factory.mktemp("hf") / "diffusiongemma")
    return build_hf_tokenizer(path, ["Hello world"])


def _as_run(words: list[str], hf_dir: Path) -> list[str]:
    words = [str(hf_dir) if re.fullmatch(r"/path/to/(hf/)?diffusiongemma", w) else w for w in words]
    if words[0] == "torchrun":
        words = [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    elif words[0] == "python" or words[0].endswith("/bin/python"):
        words = [sys.executable, *words[1:]]
    if "examples/pretrain_bdgemma.py" in words:
        words += SHORT_TRAINING
    if "tools/generate.py" in words:
        words += SHORT_GENERATION
    return words


def _run(words: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(words, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    shown = shlex.join(words)
    assert done.returncode == 0, f"{shown} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    noise = [line for line in done.stderr.splitlines() if NOISE.search(line)]
    assert not noise, f"{shown}: dependency noise on stderr:\n" + "\n".join(noise)
    return done


def test_readme_commands_run_after_make_demo(tmp_path, model_parallel, hf_diffusiongemma):
    from megatron_bdgemma.training.config import load_run_config

    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("examples", "tools"):
        shutil.copytree(REPO / name, clone / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("README.md", "Makefile"):
        shutil.copy(REPO / name, clone / name)

    for words in makefile_recipe("demo"):
        done = _run(_as_run(words, hf_diffusiongemma), clone)
        if "examples/pretrain_bdgemma.py" in words:
            assert done.stderr == "", f"the demo's stderr must be empty:\n{done.stderr}"
            assert "saved checkpoint" in done.stdout and "sample (" in done.stdout, done.stdout

    commands = bash_commands(README)
    assert len(commands) >= 10, commands
    ran = []
    for words in commands:
        if words[0] == "make":
            continue  # `make demo` ran above from its recipe; `make test` is this suite
        if words[0] == "export":
            assert len(words) == 2 and "=" in words[1], words
            continue  # sets the shell's environment for the commands after it on the GPU machine
        if GPU_SETUP in words:
            step = words[words.index(GPU_SETUP) + 1]
            _run([sys.executable, GPU_SETUP, step, "--help"], clone)  # the step exists; running it needs the device
            continue
        gpu_only = [GPU_ONLY[w] for w in words if w in GPU_ONLY]
        if gpu_only:
            config = words[words.index("--config") + 1]
            overrides = [w for w in words if "=" in w and not w.startswith("-")]
            load_run_config(clone / config, overrides)  # parses; running it needs gpu_only[0]
            continue
        ran.append(_run(_as_run(words, hf_diffusiongemma), clone))
    assert len(ran) >= 10

    # `transformers loads it`, at the size of the model it came from (not with a 168M-parameter vision tower).
    from transformers import DiffusionGemmaForBlockDiffusion

    from megatron_bdgemma.checkpointing import model_config_from_dict
    from megatron_bdgemma.conversion.megatron_checkpoint import read_extra

    exported = DiffusionGemmaForBlockDiffusion.from_pretrained(clone / "hf" / "tiny_sft")
    config = model_config_from_dict(read_extra(clone / "runs" / "tiny_sft")["model_config"])
    ours = _parameter_count(config)
    theirs = sum(p.numel() for p in exported.parameters())
    assert ours <= theirs <= 1.02 * ours, (theirs, ours)


def test_readme_commands_write_only_where_git_ignores():
    """What the README's commands and `make demo` write (`--out`, a run's `checkpoint.save` and `data.cache_dir`,
    from its overrides or YAML) lies under a top-level directory `.gitignore` names, so `git status` stays clean.
    Absolute paths (the `/path/to` placeholders) are outside the checkout."""
    from megatron_bdgemma.training.config import load_run_config

    ignored = set(re.findall(r"^/([^/*!\s]+)/", (REPO / ".gitignore").read_text(), re.M))
    written = []
    for words in [*makefile_recipe("demo"), *bash_commands(README)]:
        written += [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--out"]
        if "examples/pretrain_bdgemma.py" in words and "--load" not in words:  # --load writes into its own run
            config = words[words.index("--config") + 1] if "--config" in words else "examples/configs/tiny_pretrain.yaml"
            run = load_run_config(REPO / config, [w for w in words if "=" in w and not w.startswith("-")])
            written += [run.checkpoint.save, run.data.cache_dir]
    relative = [path for path in written if path and not path.startswith("/")]
    assert len(relative) >= 10, written
    assert all(Path(path).parts[0] in ignored for path in relative), (sorted(set(relative)), sorted(ignored))


def _parameter_count(config) -> int:
    from megatron_bdgemma.model import BDGemmaModel
    from megatron_bdgemma.runtime.distributed import ensure_model_parallel

    ensure_model_parallel()
    return sum(p.numel() for p in BDGemmaModel(config).parameters())


def test_readme_python_snippet_runs(model_parallel, hf_diffusiongemma):
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) == 1, "the README has one Python snippet"
    code = blocks[0].replace("/path/to/hf/diffusiongemma", str(hf_diffusiongemma))
    assert code != blocks[0], "the snippet must load its model from /path/to/hf/diffusiongemma"
    namespace: dict = {}
    exec(compile(code, "README.md (python block)", "exec"), namespace)
    model, R = namespace["model"], namespace["R"]
    assert namespace["logits"].shape == (1, R, model.config.vocab_size)
    assert namespace["enc"].logits.shape == (1, namespace["prompt_ids"].shape[1], model.config.vocab_size)
    assert namespace["out"].generated.shape[0] == 1


def test_docs_and_comments_cite_only_files_in_the_repository():
    """README and docs/ name files of this repository only, and every `docs/design.md §N` cited in code exists."""
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text()
        assert "../" not in text and "shared/" not in text, f"{doc.name} points outside the repository"
        for ref in re.findall(r"`([\w./-]+/[\w.-]+\.(?:md|py|yaml|sbatch))`", text):
            assert (REPO / ref).exists(), f"{doc.name} names {ref}, which is not in the repository"
    sections = set(re.findall(r"^## (\d+)\.", (REPO / "docs" / "design.md").read_text(), re.M))
    sources = [*REPO.glob("megatron_bdgemma/**/*.py"), *REPO.glob("tests/*.py"), *REPO.glob("tools/*.py")]
    cited = {(p.name, n) for p in sources for n in re.findall(r"docs/design\.md §(\d+)", p.read_text())}
    assert cited, "the code cites docs/design.md"
    missing = sorted((name, n) for name, n in cited if n not in sections)
    assert not missing, f"cited sections missing from docs/design.md: {missing}"
