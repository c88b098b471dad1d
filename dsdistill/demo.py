"""The embedded default: a tiny teacher that has learned something, a smaller student, local data.

`dsdistill demo` builds (and caches) a generated corpus, a word-level tokenizer made from it, a small
Llama-shaped teacher trained briefly on the corpus, and a narrower, shallower student with a different
head layout; then it runs distillation with the default curriculum under the real DeepSpeed launcher.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen".split()
NAMES = "ada bob cy dee eve fay gus hal ivy jo kim lu max ned ola pia".split()
ADJS = "red blue green small big old new warm".split()
NOUNS = "cat dog box cup hat key map pen".split()
STORY = "sun rain wind tree road house river hill bird fish boat door lamp rock star moon".split()
SPECIALS = ["<unk>", "<eos>", "<pad>"]
CORPUS_VERSION = "v2"


def _dirichlet(rng: random.Random, k: int, alpha: float) -> list[float]:
    draws = [rng.gammavariate(alpha, 1.0) for _ in range(k)]
    total = sum(draws)
    return [d / total for d in draws]


# Why stochastic text: where every continuation is determined, a one-hot label says all there is to say
# and the teacher adds nothing. Here each name has its own distribution over what it likes and each story
# word a distribution over the next one (fixed tables, drawn once): the teacher, trained on far more text
# than the student sees, knows those distributions, and its soft targets carry them in every position.
_TABLES = random.Random(1234)
LIKES_ADJ = {n: _dirichlet(_TABLES, len(ADJS), 0.6) for n in NAMES}
LIKES_NOUN = {n: _dirichlet(_TABLES, len(NOUNS), 0.6) for n in NAMES}
STORY_NEXT = {w: _dirichlet(_TABLES, len(STORY), 0.4) for w in STORY}
KIND_WEIGHTS = (1, 1, 1, 1, 2)
"""count, likes, copy, sums, story."""


def _sentence(rng: random.Random) -> str:
    kind = rng.choices(range(5), weights=KIND_WEIGHTS)[0]
    if kind == 0:  # counting: fully predictable after the first number
        start = rng.randrange(0, 9)
        return "count : " + " ".join(NUMBERS[start : start + rng.randrange(3, 7)]) + " ."
    if kind == 1:  # preferences: each name draws from its own distribution (soft knowledge)
        n = rng.choice(NAMES)
        return f"{n} likes the {rng.choices(ADJS, LIKES_ADJ[n])[0]} {rng.choices(NOUNS, LIKES_NOUN[n])[0]} ."
    if kind == 2:  # copy: needs attention to earlier tokens
        words = [rng.choice(ADJS + NOUNS) for _ in range(rng.randrange(2, 5))]
        return "copy : " + " ".join(words) + " | " + " ".join(words) + " ."
    if kind == 3:  # small sums
        a, b = rng.randrange(0, 8), rng.randrange(0, 8)
        return f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]} ."
    w = rng.choice(STORY)  # stories: a Markov chain with a stochastic next word
    words = [w]
    for _ in range(rng.randrange(4, 9)):
        w = rng.choices(STORY, STORY_NEXT[w])[0]
        words.append(w)
    return "story : " + " ".join(words) + " ."


def write_corpus(path: Path, *, documents: int, seed: int = 0) -> Path:
    """A jsonl file of generated documents (a few sentences each) in a `text` field."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(documents):
            doc = " ".join(_sentence(rng) for _ in range(rng.randrange(2, 6)))
            fh.write(json.dumps({"text": doc}) + "\n")
    return path


CHAT_MARKERS = ["<|im_start|>", "<|im_end|>"]
ROLE_WORDS = ["system", "user", "assistant", "tool"]


def build_tokenizer(out_dir: Path, *, chat: bool = False):
    """A word-level fast tokenizer over the corpus vocabulary, saved with `save_pretrained`. `chat` adds
    the ChatML markers (as special tokens), the role names and the ChatML template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(
        {*NUMBERS, *NAMES, *ADJS, *NOUNS, *STORY, "count", "likes", "the", "copy", "plus", "is", "story", ":", "|", "."}
    )
    specials = SPECIALS + (CHAT_MARKERS if chat else [])
    vocab = {w: i for i, w in enumerate(specials + words + (ROLE_WORDS if chat else []))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if chat:
        tok.add_special_tokens(CHAT_MARKERS)  # split out of the text before words are
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
    if chat:
        from dsdistill.formats import CHATML

        fast.chat_template = CHATML
    fast.save_pretrained(out_dir)
    return fast


def build_bpe_tokenizer(out_dir: Path, texts: list[str], *, vocab_size: int = 300):
    """A byte-level BPE fast tokenizer trained on `texts` (another tokenisation of the demo corpus than the
    word-level one: what a cross-tokenizer run and its benchmark pair), saved with `save_pretrained`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=alphabet))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(out_dir)
    return fast


def write_chat(path: Path, *, conversations: int, seed: int = 0) -> Path:
    """A jsonl file of generated conversations in a `messages` field: an optional system prompt, one to
    three user/assistant exchanges, some with a tool turn between an assistant call and its answer."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(conversations):
            messages = []
            if rng.random() < 0.5:
                messages.append({"role": "system", "content": _sentence(rng)})
            for _ in range(rng.randrange(1, 4)):
                messages.append({"role": "user", "content": _sentence(rng)})
                if rng.random() < 0.3:
                    messages.append({"role": "assistant", "content": "copy " + _sentence(rng)})
                    messages.append({"role": "tool", "content": _sentence(rng)})
                messages.append({"role": "assistant", "content": _sentence(rng)})
            fh.write(json.dumps({"messages": messages}) + "\n")
    return path


def write_prompt_completion(path: Path, *, examples: int, seed: int = 0) -> Path:
    """A jsonl file of generated `prompt` / `completion` pairs."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(examples):
            fh.write(json.dumps({"prompt": _sentence(rng) + " ", "completion": _sentence(rng)}) + "\n")
    return path


def tiny_llama(vocab: int, *, hidden: int, layers: int, heads: int, kv_heads: int, max_pos: int = 256, seed: int = 0):
    """A randomly initialised Llama-shaped causal LM built from a config."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=2,
    )
    return AutoModelForCausalLM.from_config(cfg)


def pretrain(model, tokenizer, corpus: Path, *, steps: int, seq_len: int = 64, batch: int = 16, lr: float = 3e-3, seed: int = 0):
    """Plain-PyTorch LM training of the teacher on the corpus (so it has something to teach)."""
    import torch

    ids: list[int] = []
    for line in corpus.read_text().splitlines():
        ids.extend(tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    data = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    loss = None
    for _ in range(steps):
        x = data[torch.randint(0, data.size(0), (batch,), generator=gen)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach()) if loss is not None else float("nan")


def default_cache() -> Path:
    base = os.environ.get("DSDISTILL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "dsdistill"
    )
    return Path(base) / f"demo-{CORPUS_VERSION}"


def ensure_assets(cache: Path, *, teacher_steps: int = 1000, documents: int = 4000, log=print) -> dict[str, Path]:
    """Corpus, tokenizer, trained teacher and initial student under `cache`, built once and reused."""
    paths = {
        "corpus": cache / "corpus.jsonl",
        "tokenizer": cache / "tokenizer",
        "teacher": cache / "teacher",
        "student": cache / "student",
    }
    if all((p / "config.json").exists() for p in (paths["teacher"], paths["student"])) and paths["corpus"].exists():
        return paths
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cache.mkdir(parents=True, exist_ok=True)
    write_corpus(paths["corpus"], documents=documents)
    # the teacher learns from its own, larger corpus (same generator, other draws): it never sees the
    # student's data, so its eval perplexity on the student's held-out split is honest
    teacher_corpus = write_corpus(cache / "teacher-corpus.jsonl", documents=3 * documents, seed=1)
    tok = build_tokenizer(paths["tokenizer"])
    t0 = time.time()
    teacher = tiny_llama(len(tok), hidden=128, layers=4, heads=4, kv_heads=2, seed=1)
    log(
        f"demo: training the tiny teacher ({sum(p.numel() for p in teacher.parameters()):,} params) for {teacher_steps} steps ..."
    )
    final = pretrain(teacher, tok, teacher_corpus, steps=teacher_steps)
    log(f"demo: teacher trained in {time.time() - t0:.0f}s (final LM loss {final:.3f})")
    student = tiny_llama(len(tok), hidden=64, layers=2, heads=2, kv_heads=1, seed=2)
    for key, model in (("teacher", teacher), ("student", student)):
        tmp = cache / f".{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(paths[key], ignore_errors=True)
        tmp.rename(paths[key])
    return paths


def demo_config(paths: dict[str, Path], run_dir: Path, *, steps: int, seed: int = 0) -> dict:
    """The demo's run config: default curriculum, small batches, fp32 on CPU."""
    return {
        "teacher": {"path": str(paths["teacher"])},
        "student": {"path": str(paths["student"])},
        "data": {"path": str(paths["corpus"]), "eval_fraction": 0.05},
        "train": {"max_steps": steps, "micro_batch_size": 8, "grad_accum": 1, "seq_len": 64, "seed": seed},
        "optimizer": {"lr": 3e-3},
        "scheduler": {"kind": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1},
        "eval": {"every": max(1, steps // 5), "max_batches": 8},
        "output": {"run_dir": str(run_dir), "log_every": max(1, steps // 20)},
    }


NO_TEACHER_SUFFIX = "-no-teacher"
NO_TEACHER_CURRICULUM = {"weights": {"lm": 1.0}}
"""The control: the same student trained on the LM loss alone."""


def no_teacher_config(config: dict) -> dict:
    """The same run without the teacher's signal: identical data, seed, steps and LR schedule; only the
    curriculum (LM alone) and the run directory differ."""
    out = json.loads(json.dumps(config))
    out["curriculum"] = json.loads(json.dumps(NO_TEACHER_CURRICULUM))
    out["output"]["run_dir"] = config["output"]["run_dir"] + NO_TEACHER_SUFFIX
    return out


def launcher_command(script: Path, config: Path, *, nprocs: int, master_port: Optional[int] = None) -> list[str]:
    """`deepspeed --num_gpus N dsdistill/train.py --config ...` through this interpreter."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs)]
    if master_port is not None:
        cmd += ["--master_port", str(master_port)]
    return cmd + [str(script), "--config", str(config)]


def launcher_env() -> dict[str, str]:
    """Environment for a launch: the CPU accelerator where no GPU is present, one thread per rank, and no
    world variables inherited from a run this is started from (the launcher sets its own)."""
    from dsdistill.dist import without_world_env

    env = without_world_env(dict(os.environ))
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def summarize(metrics: Path) -> dict:
    """Eval perplexities of the last run in a metrics file."""
    from dsdistill.schema import EvalRecord, RunStart, parse_line

    evals: list[EvalRecord] = []
    for line in metrics.read_text().splitlines():
        rec = parse_line(line)
        if isinstance(rec, RunStart) and not rec.resumed:
            evals = []  # a fresh start; a resumed one continues the same run (a finished run relaunched too)
        elif isinstance(rec, EvalRecord):
            evals.append(rec)
    if not evals:
        return {}
    probe = evals[-1].on_policy
    return {
        "first_ppl": evals[0].ppl,
        "last_ppl": evals[-1].ppl,
        "teacher_ppl": evals[-1].teacher_ppl,
        "evals": [(e.step, e.ppl) for e in evals],
        **{k: probe[k] for k in ("reverse_kl", "mean_length", "stop_rate") if probe.get(k) is not None},
    }


def _launch(config: dict, path: Path, *, nprocs: int) -> int:
    """Write `config` to `path` and run it under the DeepSpeed launcher on `nprocs` ranks."""
    import yaml

    from dsdistill import train as train_module
    from dsdistill.dist import free_port

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = launcher_command(Path(train_module.__file__), path, nprocs=nprocs, master_port=free_port())
    print("demo: " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=launcher_env())


def _completed(config: dict, path: Path) -> bool:
    """Whether the run at `path` (its run.yaml) is this very config and ended completed: a second `make demo`
    then prints the same numbers without launching anything."""
    import yaml

    from dsdistill.errors import DistillError
    from dsdistill.schema import METRICS_FILE, RunEnd, parse_line

    metrics = path.parent / METRICS_FILE
    try:
        if yaml.safe_load(path.read_text()) != config:
            return False
        with open(metrics, "rb") as fh:
            fh.seek(max(0, metrics.stat().st_size - (64 << 10)))
            lines = [ln for ln in fh.read().splitlines() if ln.strip()]
        last = parse_line(lines[-1].decode()) if lines else None
    except (OSError, ValueError, yaml.YAMLError, DistillError):
        return False
    return isinstance(last, RunEnd) and last.reason == "completed" and last.step == config["train"]["max_steps"]


def run_demo(*, run_dir: Path, steps: int, nprocs: int, cache: Optional[Path] = None, seed: int = 0, control: bool = True) -> int:
    """Build assets, distil, then train the same student without the teacher; print all three perplexities."""
    from dsdistill.schema import METRICS_FILE

    paths = ensure_assets(cache or default_cache())
    config = demo_config(paths, run_dir, steps=steps, seed=seed)
    runs = [(config, run_dir / "run.yaml")]
    if control:
        plain = no_teacher_config(config)
        runs.append((plain, Path(plain["output"]["run_dir"]) / "run.yaml"))
    for cfg, path in runs:
        if _completed(cfg, path):
            print(f"demo: {path.parent} already completed this config's {steps} steps; not launched again", flush=True)
            continue
        rc = _launch(cfg, path, nprocs=nprocs)
        if rc != 0:
            print(f"demo: the launch for {path.parent} failed with exit code {rc}", file=sys.stderr)
            return rc
    distilled = summarize(run_dir / METRICS_FILE)
    if not distilled:
        return 0
    print(
        f"demo: student eval perplexity {distilled['first_ppl']:.2f} -> {distilled['last_ppl']:.2f} "
        f"(teacher {distilled['teacher_ppl']:.2f}); metrics in {run_dir / METRICS_FILE}",
        flush=True,
    )
    if control:
        alone = summarize(Path(runs[1][0]["output"]["run_dir"]) / METRICS_FILE)
        if alone:
            d, s = distilled["last_ppl"], alone["last_ppl"]
            print(
                f"demo: eval perplexity: teacher {distilled['teacher_ppl']:.2f}, distilled student {d:.2f}, "
                f"same student without the teacher {s:.2f} (distilled is {(1 - d / s) * 100:+.1f}% lower); "
                f"compare with: dsmonitor {run_dir} {runs[1][0]['output']['run_dir']}",
                flush=True,
            )
    return 0
