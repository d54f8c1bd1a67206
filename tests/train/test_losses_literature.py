"""LD-DPO, IPO per token (TRL) and per-pair soft labels: each equals its formula, written out
here, on fixed numbers and at the first step of a real (tiny) training run."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from prefdata.train import losses
from prefdata.train.config import config_from

C = torch.tensor([-10.0, -20.0, -5.0, -7.0])   # log π(chosen), summed over tokens
R = torch.tensor([-12.0, -18.0, -9.0, -6.0])
RC = torch.tensor([-11.0, -19.0, -6.0, -7.5])
RR = torch.tensor([-11.5, -19.0, -8.0, -6.5])
NC = torch.tensor([5.0, 10.0, 2.0, 4.0])       # token counts
NR = torch.tensor([6.0, 9.0, 3.0, 4.0])
# log-probs over the first min(|y_w|, |y_l|) tokens (equal to the full sum for the shorter one)
PC = torch.tensor([-10.0, -17.0, -5.0, -7.0])
PR = torch.tensor([-10.5, -18.0, -7.0, -6.0])
PRC = torch.tensor([-11.0, -16.5, -6.0, -7.5])
PRR = torch.tensor([-10.0, -19.0, -6.5, -6.5])
BETA = 0.1


def logsig(x):
    return -math.log1p(math.exp(-x))


def check(got, expected):
    assert got.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_ld_dpo_weights_the_longer_responses_excess_by_alpha(alpha):
    """Liu et al. 2024: log π̂(y) = log π(y_{≤l_p}) + α·log π(y_{>l_p}), l_p = min(|y_w|, |y_l|),
    for the policy and the reference alike, as huggingface/trl dpo_trainer.py does today
    (LLaMA-Factory and TRL's first version leave the reference's sum whole: see ld_dpo_loss)."""
    expected = []
    for i in range(4):
        def hat(full, public):
            return public + alpha * (full - public)
        h = (hat(C[i], PC[i]) - hat(RC[i], PRC[i])) - (hat(R[i], PR[i]) - hat(RR[i], PRR[i]))
        expected.append(-logsig(BETA * h.item()))
    check(losses.ld_dpo_loss(C, R, RC, RR, PC, PR, PRC, PRR, BETA, alpha), expected)
    if alpha == 1.0:  # α = 1 is DPO
        check(losses.ld_dpo_loss(C, R, RC, RR, PC, PR, PRC, PRR, BETA, 1.0), losses.dpo_loss(C, R, RC, RR, BETA).tolist())


def test_ipo_per_token_divides_each_log_ratio_by_its_token_count():
    tau = 0.1
    expected = [(((C[i] - RC[i]) / NC[i] - (R[i] - RR[i]) / NR[i]).item() - 1 / (2 * tau)) ** 2 for i in range(4)]
    check(losses.ipo_loss(C, R, RC, RR, tau, NC, NR, normalize="per_token"), expected)
    summed = [(((C[i] - RC[i]) - (R[i] - RR[i])).item() - 1 / (2 * tau)) ** 2 for i in range(4)]
    check(losses.ipo_loss(C, R, RC, RR, tau), summed)  # the paper's sum, as before


def test_cdpo_and_rdpo_take_per_pair_soft_labels():
    p = torch.tensor([0.9, 0.6, 0.75, 0.52])  # label_prob = σ(r_w − r_l)
    h = [((C[i] - RC[i]) - (R[i] - RR[i])).item() for i in range(4)]
    cdpo = [-(p[i].item()) * logsig(BETA * h[i]) - (1 - p[i].item()) * logsig(-BETA * h[i]) for i in range(4)]
    check(losses.cdpo_loss(C, R, RC, RR, BETA, 1 - p), cdpo)
    eps = [min(1 - p[i].item(), 0.45) for i in range(4)]
    rdpo = [((1 - e) * -logsig(BETA * h[i]) + e * logsig(-BETA * h[i])) / (1 - 2 * e) for i, e in zip(range(4), eps)]
    check(losses.rdpo_loss(C, R, RC, RR, BETA, 1 - p, 0.45), rdpo)


def test_bad_settings_name_the_option():
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"train config: 'ld_alpha' must be in \[0, 1\]"):
            config_from(dict(data="x.parquet", model="m", loss="ld_dpo", ld_alpha=alpha))
    with pytest.raises(ValueError, match="option 'ipo_normalize': 'mean' is not one of"):
        config_from(dict(data="x.parquet", model="m", loss="ipo", ipo_normalize="mean"))
    with pytest.raises(ValueError, match="'label_smoothing' must be in"):
        config_from(dict(data="x.parquet", model="m", loss="cdpo", label_smoothing="soft"))


# -- first step of a real run: policy ≠ reference, so the formulas are not all log 2 ------------
@pytest.fixture(scope="module")
def reference_model(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from prefdata.models.hub import resolve

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct"))
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    path = tmp_path_factory.mktemp("tiny-reference")
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


def token_logps(model_path, data_path):
    """Per-token response log-probs of every pair, by ordinary forwards (no trainer code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefdata.train.data import load_examples

    ex = load_examples(data_path, AutoTokenizer.from_pretrained(model_path), 128)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    out = []
    with torch.no_grad():
        for i in range(len(ex)):
            prompt, responses = ex.row(i)
            row = []
            for resp in responses[:2]:
                logits = model(input_ids=torch.tensor([prompt + resp])).logits[0].float()
                lp = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
                row.append(lp.gather(-1, torch.tensor(resp)[:, None])[:, 0].numpy().astype(np.float64))
            out.append(row)
    return out


def first_loss(tiny_model, reference, data, out, **over):
    import json

    from prefdata.train.trainer import train

    values = dict(data=data, model=tiny_model, reference=reference, output=str(out), lr=2e-3, batch_size=8,
                  micro_batch_size=4, ref_batch_size=8, eval_fraction=0.0, eval_every=0, save_every=0,
                  device="cpu", max_length=128, max_steps=1)
    train(config_from({**values, **over}))
    return json.loads((out / "log.jsonl").read_text().splitlines()[-1])["loss"]


def test_first_step_losses_equal_the_formulas(tiny_model, reference_model, pairs_file, tmp_path):
    from train_data import pair_table

    table = pair_table(8, seed=3, flip_prob=False)
    p = np.linspace(0.55, 0.95, 8)
    data = pairs_file(table=table.append_column("label_prob", pa.array(p)))
    pol, ref = token_logps(tiny_model, data), token_logps(reference_model, data)
    beta, alpha = 0.1, 0.4

    def hat(tokens, other_len):
        public = min(len(tokens), other_len)
        return tokens[:public].sum() + alpha * tokens[public:].sum()

    h_ld, h_sum, h_tok = [], [], []
    for (pc, pr), (qc, qr) in zip(pol, ref):
        h_ld.append((hat(pc, len(pr)) - hat(qc, len(qr))) - (hat(pr, len(pc)) - hat(qr, len(qc))))
        h_sum.append((pc.sum() - qc.sum()) - (pr.sum() - qr.sum()))
        h_tok.append((pc.sum() - qc.sum()) / len(pc) - (pr.sum() - qr.sum()) / len(pr))
    assert any(len(pc) != len(pr) for pc, pr in pol)  # the split matters on this data
    ld = first_loss(tiny_model, reference_model, data, tmp_path / "ld", loss="ld_dpo", ld_alpha=alpha, beta=beta)
    assert ld == pytest.approx(np.mean([-logsig(beta * h) for h in h_ld]), rel=1e-4)
    assert ld != pytest.approx(np.mean([-logsig(beta * h) for h in h_sum]), rel=1e-4)  # not plain DPO
    ipo = first_loss(tiny_model, reference_model, data, tmp_path / "ipo", loss="ipo", ipo_normalize="per_token",
                     beta=beta)
    assert ipo == pytest.approx(np.mean([(h - 1 / (2 * beta)) ** 2 for h in h_tok]), rel=1e-4)
    cdpo = first_loss(tiny_model, reference_model, data, tmp_path / "cdpo", loss="cdpo",
                      label_smoothing="label_prob", beta=beta)
    want = np.mean([-q * logsig(beta * h) - (1 - q) * logsig(-beta * h) for q, h in zip(p, h_sum)])
    assert cdpo == pytest.approx(want, rel=1e-4)
    rdpo = first_loss(tiny_model, reference_model, data, tmp_path / "rdpo", loss="rdpo", rdpo_eps="label_prob",
                      beta=beta)
    eps = np.minimum(1 - p, 0.45)
    want = np.mean([((1 - e) * -logsig(beta * h) + e * logsig(-beta * h)) / (1 - 2 * e) for e, h in zip(eps, h_sum)])
    assert rdpo == pytest.approx(want, rel=1e-4)


def test_soft_labels_need_the_column(tiny_model, pairs_file, tmp_path):
    from prefdata.train.data import DataError

    with pytest.raises(DataError, match="'label_prob' column .* build_pairs with label_prob: true"):
        first_loss(tiny_model, None, pairs_file(8), tmp_path / "x", loss="cdpo", label_smoothing="label_prob")
