"""Hidden-state, contrastive, router and attention components against float64 references written here,
and the attention rebuild against eager attention. KD divergences are in tests/test_kd.py."""

import math

import pytest
import torch

from dsdistill.capture import QKCapture
from dsdistill.losses.attention import attention_loss, head_avg_log_probs, routing_attention_loss
from dsdistill.losses.contrastive import info_nce, mean_pool
from dsdistill.losses.hidden import feature_loss, layerwise_loss, load_balance_loss, routing_feature_loss
from tests.test_kd import D64, IGN, labels_for

# ------------------------------------------------------------------ references (plain Python math)


def ref_layernorm(vec, eps=1e-5):
    mu = sum(vec) / len(vec)
    var = sum((x - mu) ** 2 for x in vec) / len(vec)
    return [(x - mu) / math.sqrt(var + eps) for x in vec]


# ------------------------------------------------------------------ hidden-state components


def hidden(seed, b=2, s=5, d=4):
    return torch.randn(b, s, d, generator=torch.Generator().manual_seed(seed), dtype=D64)


@pytest.mark.parametrize("metric", ["mse", "cosine"])
@pytest.mark.parametrize("normalized", [True, False])
def test_feature_matches_reference(metric, normalized):
    lab = labels_for()
    pairs = [(hidden(1), hidden(2)), (hidden(3), hidden(4))]
    got, m = feature_loss(pairs, lab, ignore_index=IGN, metric=metric, normalized=normalized)
    total = 0.0
    for s, t in pairs:
        for i in range(2):
            for p in range(4):
                if lab[i, p + 1] == IGN:
                    continue
                a, b = s[i, p].tolist(), t[i, p].tolist()
                if normalized:
                    a, b = ref_layernorm(a), ref_layernorm(b)
                if metric == "mse":
                    total += sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)
                else:
                    total += 1 - sum(x * y for x, y in zip(a, b)) / (
                        math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
                    )
    assert m["count"] == 7 and float(got) == pytest.approx(total / 2, rel=1e-9)
    s0 = hidden(1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: feature_loss([(x, hidden(2))], lab, metric=metric, normalized=normalized)[0], (s0,))


def test_layerwise_is_normalised_mse_averaged_over_layers():
    lab = labels_for()
    pairs = [(hidden(5), hidden(6) * 100), (hidden(7), hidden(8) * 10)]  # very different scales per layer
    got, _ = layerwise_loss(pairs, lab, ignore_index=IGN)
    ref, _ = feature_loss(pairs, lab, ignore_index=IGN, metric="mse", normalized=True)
    assert float(got) == pytest.approx(float(ref), rel=1e-12)
    unscaled, _ = layerwise_loss([(hidden(5), hidden(6)), (hidden(7), hidden(8))], lab, ignore_index=IGN)
    assert float(got) == pytest.approx(float(unscaled), rel=1e-3)  # each layer's scale is normalised away


def test_routing_feature_and_load_balance_match_reference():
    lab = labels_for()
    teacher = [hidden(10), hidden(11), hidden(12)]
    student = [hidden(13), hidden(14)]
    gates = torch.softmax(torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=D64), -1).requires_grad_(True)
    got, _ = routing_feature_loss(student, teacher, gates, lab, ignore_index=IGN)
    total = 0.0
    for li, s in enumerate(student):
        for i in range(2):
            for p in range(4):
                if lab[i, p + 1] == IGN:
                    continue
                a = ref_layernorm(s[i, p].tolist())
                for j in range(3):  # the gate-weighted sum of per-layer errors
                    t = ref_layernorm(teacher[j][i, p].tolist())
                    total += float(gates.detach()[li, j]) * sum((x - y) ** 2 for x, y in zip(a, t)) / 4
    assert float(got) == pytest.approx(total / 2, rel=1e-9)
    assert torch.autograd.gradcheck(lambda g: routing_feature_loss(student, teacher, g, lab)[0], (gates,))
    uniform = torch.full((4, 3), 1 / 3, dtype=D64)
    assert float(load_balance_loss(uniform)[0]) == pytest.approx(1.0)
    collapsed = torch.tensor([[0.98, 0.01, 0.01]] * 4, dtype=D64)
    assert float(load_balance_loss(collapsed)[0]) == pytest.approx(3 * 0.98)


def test_the_router_prefers_the_teacher_layer_the_student_matches():
    """The audit's case: a student correlated 0.3 with teacher layer 1 only. With a mixture target, uniform
    gates scored lower (1.141 vs 1.426 per token) than the gate on the matching layer; the gate-weighted
    per-layer error ranks the matching layer first, and its gradient pushes the gate towards it."""
    g = torch.Generator().manual_seed(7)
    teacher = [torch.randn(2, 64, 16, generator=g, dtype=D64) for _ in range(4)]
    noise = torch.randn(2, 64, 16, generator=g, dtype=D64)
    student = [0.3 * teacher[1] + (1 - 0.3**2) ** 0.5 * noise]
    lab = torch.zeros(2, 64, dtype=torch.long)
    one_hot = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=D64)
    uniform = torch.full((1, 4), 0.25, dtype=D64)
    per_token = lambda gates: float(routing_feature_loss(student, teacher, gates, lab)[0]) / (2 * 63)  # noqa: E731
    assert per_token(one_hot) < per_token(uniform)
    for j in (0, 2, 3):
        other = torch.zeros(1, 4, dtype=D64)
        other[0, j] = 1.0
        assert per_token(one_hot) < per_token(other)
    logits = torch.zeros(1, 4, dtype=D64, requires_grad=True)
    routing_feature_loss(student, teacher, torch.softmax(logits, -1), lab)[0].backward()
    assert int(logits.grad.argmin()) == 1  # descending the gradient raises the matching layer's gate
    assert torch.autograd.gradcheck(
        lambda g: load_balance_loss(torch.softmax(g, -1))[0], (torch.randn(4, 3, dtype=D64, requires_grad=True),)
    )


def test_contrastive_matches_reference():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(3, 5, generator=g, dtype=D64), torch.randn(3, 5, generator=g, dtype=D64)
    valid = torch.tensor([True, False, True])
    got, m = info_nce(s, t, temperature=0.2, valid=valid)
    total = 0.0

    def norm(v):
        return [x / math.sqrt(sum(y * y for y in v)) for x in v]

    for i in range(3):
        if not valid[i]:
            continue
        # the empty sequence (1) is no negative either
        row = {j: sum(a * b for a, b in zip(norm(s[i].tolist()), norm(t[j].tolist()))) / 0.2 for j in range(3) if valid[j]}
        total += -row[i] + math.log(sum(math.exp(x) for x in row.values()))
    assert m["count"] == 2 and float(got) == pytest.approx(total, rel=1e-9)
    # an empty sequence's all-zero pooled state does not change the others' value (it did as a negative)
    zeroed = t.clone()
    zeroed[1] = 0.0
    assert float(info_nce(s, zeroed, temperature=0.2, valid=valid)[0]) == pytest.approx(total, rel=1e-12)
    # gathered negatives: invalid ones from other ranks are left out too
    negs = torch.cat([t, torch.zeros(2, 5, dtype=D64)])
    flags = torch.tensor([True, False, True, False, False])
    got2, _ = info_nce(s, t, temperature=0.2, valid=valid, teacher_negatives=negs, negatives_valid=flags, offset=0)
    assert float(got2) == pytest.approx(total, rel=1e-12)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: info_nce(x, t, temperature=0.2, valid=valid)[0], (s,))
    pooled = mean_pool(hidden(1), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))
    assert torch.allclose(pooled[0], hidden(1)[0, :2].mean(0))


# ------------------------------------------------------------------ attention


def qk(seed, b=2, h=4, hk=2, s=6, d=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, s, d, generator=g, dtype=D64), torch.randn(b, hk, s, d, generator=g, dtype=D64)


def ref_head_avg(q, k):
    """[B, S, S] head-averaged causal attention, by explicit loops (GQA: query head h uses key head h // group)."""
    b, h, s, d = q.shape
    group = h // k.size(1)
    out = torch.zeros(b, s, s, dtype=D64)
    for bi in range(b):
        for hi in range(h):
            for i in range(s):
                sc = [float(q[bi, hi, i] @ k[bi, hi // group, j]) / math.sqrt(d) for j in range(i + 1)]
                m = max(sc)
                e = [math.exp(x - m) for x in sc]
                for j in range(i + 1):
                    out[bi, i, j] += e[j] / sum(e) / h
    return out


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_attention_matches_reference_with_gqa_and_different_head_counts(chunk):
    (qs, ks), (qt, kt) = qk(1, h=2, hk=1), qk(2, h=4, hk=2)  # student 2 heads / 1 kv; teacher 4 / 2
    lab = labels_for(s=6, masked=((1, 3),))
    got, m = attention_loss([((qs, ks), (qt, kt))], lab, ignore_index=IGN, chunk=chunk)
    ps, pt = ref_head_avg(qs, ks), ref_head_avg(qt, kt)
    total = 0.0
    for bi in range(2):
        for i in range(5):
            if lab[bi, i + 1] == IGN:
                continue
            total += sum(float(pt[bi, i, j]) * math.log(float(pt[bi, i, j]) / float(ps[bi, i, j])) for j in range(i + 1))
    assert m["count"] == 9 and float(got) == pytest.approx(total, rel=1e-9)
    qs.requires_grad_(True)
    ks.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: attention_loss([((a, b), (qt, kt))], lab, chunk=chunk)[0], (qs, ks))


def test_routing_attention_alignment_matches_reference():
    (qs, ks) = qk(1, h=2, hk=1, s=4)
    teachers = [qk(10 + j, s=4) for j in range(3)]
    lab = labels_for(s=4, masked=())
    gates = torch.softmax(torch.randn(1, 3, generator=torch.Generator().manual_seed(2), dtype=D64), -1).requires_grad_(True)
    got, _ = routing_attention_loss([(qs, ks)], teachers, gates, lab, chunk=2)
    ps = ref_head_avg(qs, ks)
    pts = [ref_head_avg(q, k) for q, k in teachers]
    total = 0.0
    for bi in range(2):
        for i in range(3):
            for j in range(i + 1):
                mix = sum(float(gates[0, t]) * float(pts[t][bi, i, j]) for t in range(3))
                total += mix * math.log(mix / float(ps[bi, i, j]))
    assert float(got) == pytest.approx(total, rel=1e-9)
    assert torch.autograd.gradcheck(lambda g: routing_attention_loss([(qs, ks)], teachers, g, lab, chunk=2)[0], (gates,))


def _tiny(kind: str, attn: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    torch.manual_seed(0)
    common = dict(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    cfg = LlamaConfig(**common) if kind == "llama" else Qwen3Config(head_dim=8, **common)
    cfg._attn_implementation = attn
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).double().eval()


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_captured_attention_equals_eager_attention_while_running_sdpa(kind):
    sdpa = _tiny(kind, "sdpa")
    eager = _tiny(kind, "eager")
    eager.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    cap = QKCapture(sdpa, [1, 2])
    with torch.no_grad():
        out_sdpa = sdpa(input_ids=ids)
        out_eager = eager(input_ids=ids, output_attentions=True)
    assert sdpa.config._attn_implementation == "sdpa"
    assert torch.allclose(out_sdpa.logits, out_eager.logits, atol=1e-8)
    captured = cap.collect()
    for layer in (1, 2):
        q, k = captured[layer]
        ours = head_avg_log_probs(q, k, 0, 12).exp()
        reference = out_eager.attentions[layer - 1].mean(1)
        assert torch.allclose(ours, reference, atol=1e-10), (kind, layer)
