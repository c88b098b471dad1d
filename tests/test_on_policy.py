"""On-policy distillation: completions sampled from the current student under a scheduled fraction.

Against real engines: sampled completions carry loss and their prompts do not; samples come from the
weights of the current step; the fraction follows the schedule at every step, also after a resume; a run
at on_policy 0 is bit for bit the off-policy run; and ZeRO-3 on two ranks samples what one rank samples."""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from dsdistill.config import validate
from dsdistill.errors import DistillError
from dsdistill.rollout import StudentSampler, apply_rollouts
from dsdistill.schema import METRICS_FILE, TrainRecord, parse_line
from dsdistill.train import open_session, train

PROBE = Path(__file__).with_name("rollout_probe.py")


def _cfg(chat_config, chat_assets, tmp_path, **over):
    base = chat_config(
        data={"path": str(chat_assets["pairs"]), "format": "prompt_completion", "packing": "none"},
        train={"max_steps": 4, "micro_batch_size": 2, "grad_accum": 2, "seq_len": 48},
        curriculum={
            "weights": {"kd": 1.0, "lm": 0.5},
            "on_policy": {"kind": "linear", "start": 0.0, "end": 1.0, "start_value": 0.0, "end_value": 1.0},
        },
        generation={"max_new_tokens": 12, "temperature": 1.0},
        eval={"every": 0, "at_start": False, "max_batches": 1},
    )
    for key, value in over.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    base["output"] = {**base["output"], "run_dir": str(tmp_path / over.get("_name", "run"))}
    base.pop("_name", None)
    return base


def _trains(run_dir) -> list[TrainRecord]:
    return [r for r in map(parse_line, (Path(run_dir) / METRICS_FILE).read_text().splitlines()) if isinstance(r, TrainRecord)]


def test_the_schedule_is_validated_and_needs_prompts_one_per_sequence(chat_config, chat_assets, tmp_path):
    from dsdistill.errors import ConfigError
    from dsdistill.preflight import preflight

    bad = _cfg(chat_config, chat_assets, tmp_path, curriculum={"on_policy": 1.5})
    with pytest.raises(ConfigError, match=r"^curriculum: .*on_policy must stay within \[0, 1\]; it is 1.5"):
        validate(bad)
    packed = _cfg(chat_config, chat_assets, tmp_path, data={"packing": "documents"})
    with pytest.raises(
        DistillError, match=r"^curriculum.on_policy: a sampled completion replaces one example's; set data.packing: none"
    ):
        preflight(validate(packed), world=1)


def test_sampled_completions_carry_loss_and_prompts_do_not(chat_config, chat_assets, tmp_path):
    cfg = validate(_cfg(chat_config, chat_assets, tmp_path))
    with contextlib.redirect_stdout(io.StringIO()), open_session(cfg) as s:
        stream = iter(s.data.stream)
        window = [next(stream) for _ in range(2)]
        sampler = s.trainer.rollouts
        out, stats = apply_rollouts(
            window, fraction=0.75, backend=sampler, generation=cfg.generation, step=0, seed=0, pad=sampler.pad, ignore_index=-100
        )
    assert stats.sequences == 3 and stats.tokens > 0
    rows = [(b, i) for b in range(2) for i in range(2)]
    for n, (b, i) in enumerate(rows):
        before, after = window[b], out[b]
        if n == 3:  # past the fraction: untouched
            assert all(torch.equal(before[k][i], after[k][i]) for k in before)
            continue
        labels, ids = after["labels"][i], after["input_ids"][i]
        prompt_len = int(torch.nonzero(before["labels"][i] != -100).flatten()[0])
        assert torch.equal(ids[:prompt_len], before["input_ids"][i][:prompt_len])  # the dataset's prompt
        assert (labels[:prompt_len] == -100).all()  # the prompt carries no loss
        carried = torch.nonzero(labels != -100).flatten()
        assert carried.min() == prompt_len and torch.equal(labels[carried], ids[carried])  # the completion does
        assert len(carried) <= cfg.generation.max_new_tokens and (labels[prompt_len + len(carried) :] == -100).all()


def test_samples_come_from_the_weights_of_the_current_step(chat_config, chat_assets, tmp_path):
    cfg = validate(_cfg(chat_config, chat_assets, tmp_path))
    prompts, seeds = [[5, 6, 7], [8, 9, 10, 11]], [3, 4]
    with contextlib.redirect_stdout(io.StringIO()), open_session(cfg) as s:
        sampler: StudentSampler = s.trainer.rollouts
        a = sampler.generate(prompts, seeds=seeds, max_new=[10, 10])
        assert sampler.generate(prompts, seeds=seeds, max_new=[10, 10]) == a  # the seed fixes the sample
        head = s.student.module.model.get_output_embeddings().weight
        with torch.no_grad():
            head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
        assert sampler.generate(prompts, seeds=seeds, max_new=[10, 10]) != a


def test_the_fraction_follows_the_schedule_at_every_step_also_after_resume(chat_config, chat_assets, tmp_path):
    whole = _cfg(chat_config, chat_assets, tmp_path, _name="whole", checkpoint={"save_final": True})
    with contextlib.redirect_stdout(io.StringIO()):
        train(validate(whole))
    recs = _trains(whole["output"]["run_dir"])
    assert [r.on_policy for r in recs] == [0.0, 0.25, 0.5, 0.75]
    assert [r.rollout["sequences"] if r.rollout else 0 for r in recs] == [0, 1, 2, 3]  # of 4 sequences a step
    assert all(r.rollout["rollout_tokens"] > 0 and r.rollout["tokens_per_s"] > 0 for r in recs[1:])
    parts = _cfg(chat_config, chat_assets, tmp_path, _name="parts", checkpoint={"save_final": True})
    with contextlib.redirect_stdout(io.StringIO()):
        train(validate({**parts, "train": {**parts["train"], "stop_at_step": 2}}))
        train(validate(parts))
    resumed = {r.step: r for r in _trains(parts["output"]["run_dir"])}
    for r in recs[2:]:
        assert resumed[r.step].on_policy == r.on_policy and resumed[r.step].rollout["sequences"] == r.rollout["sequences"]
        assert resumed[r.step].losses == r.losses  # the same samples: seeds come from (seed, step, row)


def test_on_policy_zero_is_the_off_policy_run_bit_for_bit(chat_config, chat_assets, tmp_path):
    off = _cfg(chat_config, chat_assets, tmp_path, _name="off")
    off["curriculum"] = {"weights": off["curriculum"]["weights"]}
    zero = _cfg(chat_config, chat_assets, tmp_path, _name="zero", curriculum={"on_policy": 0.0})
    with contextlib.redirect_stdout(io.StringIO()):
        train(validate(off))
        train(validate(zero))
    a, b = _trains(off["output"]["run_dir"]), _trains(zero["output"]["run_dir"])
    assert [(r.losses, r.objective, r.grad_norm) for r in a] == [(r.losses, r.objective, r.grad_norm) for r in b]
    assert all(r.rollout is None for r in b)


@pytest.mark.slow
def test_zero3_on_two_ranks_samples_what_one_rank_samples(chat_config, chat_assets, tmp_path):
    from dsdistill.demo import launcher_command, launcher_env
    from dsdistill.dist import free_port

    zero3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "train_micro_batch_size_per_gpu": "auto"}
    cfg = _cfg(chat_config, chat_assets, tmp_path, _name="two")
    cfg["deepspeed"] = {"student": {**zero3, "gradient_accumulation_steps": "auto", "train_batch_size": "auto"}, "teacher": zero3}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        launcher_command(PROBE, path, nprocs=2, master_port=free_port()),
        env=launcher_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "samples.json").read_text())
    one_cfg = validate(_cfg(chat_config, chat_assets, tmp_path, _name="one"))
    with contextlib.redirect_stdout(io.StringIO()), open_session(one_cfg) as s:
        one = StudentSampler(s.student, one_cfg.generation, eos=1, pad=2, vocab=s.plan.vocab).generate(
            [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17]], seeds=[1, 2, 3], max_new=[12, 12, 12]
        )
    assert two == one and any(len(c) > 1 for c in one)


def test_samples_per_prompt_fill_consecutive_sequences_from_one_prompt(chat_config, chat_assets, tmp_path):
    cfg = validate(_cfg(chat_config, chat_assets, tmp_path, generation={"samples_per_prompt": 2, "max_new_tokens": 12}))
    with contextlib.redirect_stdout(io.StringIO()), open_session(cfg) as s:
        stream = iter(s.data.stream)
        window = [next(stream) for _ in range(2)]
        sampler = s.trainer.rollouts
        out, stats = apply_rollouts(
            window, fraction=1.0, backend=sampler, generation=cfg.generation, step=3, seed=0, pad=sampler.pad, ignore_index=-100
        )
    assert stats.sequences == 4
    rows = [(out[b]["input_ids"][i], out[b]["labels"][i]) for b in range(2) for i in range(2)]
    for first, second in ((0, 1), (2, 3)):
        ids_a, lab_a = rows[first]
        ids_b, lab_b = rows[second]
        cut = int(torch.nonzero(lab_a != -100).flatten()[0])
        assert torch.equal(ids_a[:cut], ids_b[:cut]) and int(torch.nonzero(lab_b != -100).flatten()[0]) == cut  # one prompt


def test_multi_turn_prompts_end_at_the_last_user_turn(chat_config, chat_assets, tmp_path):
    """The prompt of a multi-turn conversation is its whole history up to the last user turn with the
    generation prompt (the audit found it cut at the first assistant turn, dropping the final question); a
    conversation that ends with a user turn is all prompt, its earlier answers included."""
    from transformers import AutoTokenizer

    convs = [json.loads(line)["messages"] for line in Path(chat_assets["chat"]).read_text().splitlines()]
    multi = [m for m in convs if sum(x["role"] == "user" for x in m) >= 2 and m[-1]["role"] == "assistant"][:40]
    last_asst = lambda m: max(i for i, x in enumerate(m) if x["role"] == "assistant")  # noqa: E731
    waiting = [m[: last_asst(m)] for m in multi]  # the same conversations, ending with their last user turn
    data = tmp_path / "multi.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in multi + waiting))
    tok = AutoTokenizer.from_pretrained(chat_assets["tokenizer"])

    def ids(messages):
        return tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False)[
            "input_ids"
        ]

    expected = {tuple(ids(m[: last_asst(m)])) for m in multi} | {tuple(ids(m)) for m in waiting}
    cfg = validate(
        _cfg(
            chat_config,
            chat_assets,
            tmp_path,
            data={"path": str(data), "format": "chat", "packing": "none", "eval_fraction": 0.05},
            train={"seq_len": 160, "micro_batch_size": 4},
        )
    )
    with contextlib.redirect_stdout(io.StringIO()), open_session(cfg) as s:
        stream = iter(s.data.stream)
        window = [next(stream) for _ in range(4)]
        sampler = s.trainer.rollouts
        out, stats = apply_rollouts(
            window, fraction=1.0, backend=sampler, generation=cfg.generation, step=0, seed=0, pad=sampler.pad, ignore_index=-100
        )
    assert stats.sequences == 16
    gen = ids([{"role": "user", "content": "x"}])[-len(tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]) :]
    users = 0
    for mb in out:
        for i in range(mb["input_ids"].size(0)):
            start = int(torch.nonzero(mb["labels"][i] != -100).flatten()[0])
            prompt = tuple(mb["input_ids"][i][:start].tolist())
            assert prompt in expected, tok.decode(list(prompt))
            assert list(prompt[-len(gen) :]) == gen  # ends with the generation prompt
            users = max(users, tok.decode(list(prompt)).count("user"))
    assert users >= 2  # multi-turn histories were kept whole


def test_each_eval_scores_the_students_own_completions_and_the_monitor_shows_them(chat_config, chat_assets, tmp_path):
    """On-policy runs were blind: no rollout statistics, no samples anywhere. Each eval now completes held-out
    prompts with the student and scores them with the teacher; the monitor shows them (`g`)."""
    import asyncio

    from transformers import AutoTokenizer

    from dsdistill.schema import EvalRecord
    from dsmonitor.app import DsMonitor
    from dsmonitor.widgets import SearchScreen

    tok = AutoTokenizer.from_pretrained(chat_assets["tokenizer"])
    stop = next(t for t in ("<|im_end|>", tok.eos_token) if t in tok.get_vocab())
    cfg = _cfg(
        chat_config,
        chat_assets,
        tmp_path,
        generation={"max_new_tokens": 12, "temperature": 1.0, "eval_prompts": 4, "stop_tokens": [stop]},
        eval={"every": 2, "at_start": True, "max_batches": 4},
    )
    with contextlib.redirect_stdout(io.StringIO()):
        train(validate(cfg))
    run_dir = Path(cfg["output"]["run_dir"])
    recs = [parse_line(x) for x in (run_dir / METRICS_FILE).read_text().splitlines()]
    evals = [r for r in recs if isinstance(r, EvalRecord)]
    assert [e.step for e in evals] == [0, 2, 4]
    for e in evals:
        p = e.on_policy
        assert p["completions"] == 4 and 0 < p["mean_length"] <= 12 and 0.0 <= p["stop_rate"] <= 1.0
        assert math.isfinite(p["reverse_kl"]) and len(p["samples"]) == 2
        assert all(s["completion"] and math.isfinite(s["teacher_logprob"]) and s["teacher_logprob"] < 0 for s in p["samples"])
    assert all("stop_rate" in r.rollout for r in _trains(run_dir)[1:])

    app = DsMonitor([str(run_dir)], poll_interval=0.02, refresh_interval=0.05)

    async def scenario():
        async with app.run_test(size=(120, 40)) as pilot:
            while app.runs[0].end is None:
                await pilot.pause(0.05)
            await pilot.press("g")
            await pilot.pause(0.3)
            assert isinstance(app.screen, SearchScreen)
            shown = app.screen.shown_text()
            assert "reverse KL" in shown and "student: " in shown and "teacher log-prob/token" in shown

    asyncio.run(scenario())


def test_an_unknown_stop_token_is_refused_by_check(chat_config, chat_assets, tmp_path):
    cfg = validate(_cfg(chat_config, chat_assets, tmp_path, generation={"stop_tokens": ["<never-seen>"]}))
    with pytest.raises(
        DistillError, match=r"^generation.stop_tokens: '<never-seen>' is not a token of the tokenizer's vocabulary"
    ):
        from dsdistill.preflight import preflight

        preflight(cfg, world=1)


def test_the_device_draw_follows_the_filtered_distribution_and_never_picks_a_filtered_token():
    """Sampling moved from a host copy of [n, V] probabilities + multinomial to an inverse-CDF draw on the
    logits' device at one uniform per row: the same distribution, nothing of size V crossing to the host."""
    from dsdistill.config import GenerationConfig
    from dsdistill.rollout import draw

    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 2
    logits[:, 7] = float("-inf")  # a token the model rules out
    n = 20_000
    for g in (GenerationConfig(), GenerationConfig(temperature=0.7, top_k=10), GenerationConfig(top_p=0.8)):
        rows = logits.repeat_interleave(n, 0)
        picks = draw(rows, torch.rand(rows.size(0), generator=torch.Generator().manual_seed(1)), g).view(4, n)
        expected = torch.softmax(_filtered(logits, g), -1)
        for r in range(4):
            freq = torch.bincount(picks[r], minlength=50).double() / n
            assert bool((freq[expected[r] == 0] == 0).all())  # filtered and ruled-out tokens never come
            assert float((freq - expected[r].double()).abs().max()) < 0.015
    # a row's token depends on its own draw only: the same uniform gives the same token in any batch
    u = torch.rand(4)
    assert draw(logits, u, GenerationConfig()).tolist() == [
        int(draw(logits[i : i + 1], u[i : i + 1], GenerationConfig())) for i in range(4)
    ]


def _filtered(logits, g):
    """An independent reading of temperature, top-k and top-p (the smallest set holding top_p of the mass)."""
    out = logits / g.temperature
    if g.top_k is not None:
        kth = out.sort(-1, descending=True).values[:, g.top_k - 1 : g.top_k]
        out = torch.where(out < kth, torch.tensor(float("-inf")), out)
    if g.top_p < 1:
        rows = []
        for row in out:
            p = torch.softmax(row, -1)
            order = p.argsort(descending=True)
            keep, total = [], 0.0
            for i in order.tolist():
                if total >= g.top_p:
                    break
                keep.append(i)
                total += float(p[i])
            masked = torch.full_like(row, float("-inf"))
            masked[keep] = row[keep]
            rows.append(masked)
        out = torch.stack(rows)
    return out


def test_an_off_policy_run_probes_its_own_completions_when_eval_prompts_is_set(chat_config, chat_assets, tmp_path):
    """The baseline an on-policy run is compared with: an off-policy run that sets generation.eval_prompts
    explicitly completes and scores held-out prompts at each eval too; left at its default it does not."""
    from dsdistill.schema import EvalRecord

    def evals(name: str, generation: dict) -> list:
        cfg = _cfg(
            chat_config,
            chat_assets,
            tmp_path,
            _name=name,
            curriculum={"on_policy": 0.0},
            generation=generation,
            train={"max_steps": 1},
            eval={"every": 1, "at_start": True, "max_batches": 2},  # 4 held-out rows: the probe takes 3
        )
        with contextlib.redirect_stdout(io.StringIO()):
            train(validate(cfg))
        lines = (tmp_path / name / METRICS_FILE).read_text().splitlines()
        return [r for r in map(parse_line, lines) if isinstance(r, EvalRecord)]

    probed = evals("probed", {"max_new_tokens": 8, "eval_prompts": 3})
    assert [e.step for e in probed] == [0, 1]
    assert all(e.on_policy["completions"] == 3 and math.isfinite(e.on_policy["reverse_kl"]) for e in probed)
    # left at its default an off-policy run does not probe, also once its config was written out whole and
    # read back (as a resumed run's is)
    plain = validate(_cfg(chat_config, chat_assets, tmp_path, curriculum={"on_policy": 0.0}))
    assert not plain.generation.probes(False) and not validate(plain.model_dump()).generation.probes(False)
