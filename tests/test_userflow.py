"""The user-facing workflow: generator directories, the ProSG pipeline, ``prosg
generate``, training and evaluation on a user JSONL, PEFT export, the selftest, and
that the main job never loses its results. Tiny random bases, a few steps each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prosg.__main__ import main
from prosg.method.generator import GeneratorConfig, SyntheticGradientGenerator
from prosg.method.train import GENERATOR, TrainConfig, response_loss, train
from prosg.models.generation import generate, prefill
from prosg.models.testing import random_model

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=24, num_hidden_layers=2, intermediate_size=40)
DATA = dict(stage_length=3, ramble_length=3, max_stages=3)
WORDS = "the cat sat on a mat and then the dog ran up a hill to see sun in sky".split()


@pytest.fixture(autouse=True)
def _one_thread(num_threads):
    with num_threads(1):
        yield


def _bench_model(seed=0, **kw):
    return random_model(vocab_size=104, **{**TINY, **kw}, seed=seed)


def _randomize_heads(gen):
    """A generator whose delta is not zero (a fresh one starts at exactly zero)."""
    with torch.no_grad():
        for head in gen.heads.values():
            head.delta.weight.normal_(0, 0.5)
    return gen


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """A 2-step generator on the benchmark task, as prosg train writes it."""
    out = tmp_path_factory.mktemp("bench") / "run"
    model = _bench_model()
    cfg = TrainConfig(steps=2, batch_size=2, data=DATA, generator=dict(rank=2, hidden_size=8))
    train(model, cfg, out, progress=False)
    return out, model


# --------------------------------------------------------------------------- directories


def test_generator_directory_round_trip(bench_run, tmp_path):
    out, model = bench_run
    config = json.loads((out / "generator_config.json").read_text())
    assert config["base_model"]["architecture"] == "RWKV4LM"
    assert config["base_model"]["config"]["hidden_size"] == 24 and len(config["base_model"]["weights_sha256"]) == 64
    assert config["tokenizer"]["kind"] == "benchmark" and config["train_config"]["steps"] == 2
    assert config["targets"][0] == "blocks.0.attention.key" and config["generator"]["rank"] == 2
    gen = SyntheticGradientGenerator.from_pretrained(out, model)
    _randomize_heads(gen)
    gen.save_pretrained(tmp_path / "again")  # the base it was loaded for is remembered
    again = SyntheticGradientGenerator.from_pretrained(tmp_path / "again", model)
    for k, v in gen.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert again.tokenizer.spec()["kind"] == "benchmark"
    # the weights file alone (what earlier releases wrote and read) still loads
    bare = SyntheticGradientGenerator.from_pretrained(tmp_path / "again" / GENERATOR, model)
    torch.testing.assert_close(bare.state_dict()["heads.blocks_0_attention_key.delta.weight"],
                               gen.state_dict()["heads.blocks_0_attention_key.delta.weight"])
    # a fresh generator needs its base named
    with pytest.raises(ValueError, match="pass the base model"):
        SyntheticGradientGenerator(model, GeneratorConfig(rank=2, hidden_size=8)).save_pretrained(tmp_path / "x")


def test_loading_onto_another_base_is_refused(bench_run):
    out, _ = bench_run
    with pytest.raises(ValueError, match=r"another base model: weights sha256"):
        SyntheticGradientGenerator.from_pretrained(out, _bench_model(seed=1))
    with pytest.raises(ValueError, match=r"hidden_size 24 vs 32"):
        SyntheticGradientGenerator.from_pretrained(out, _bench_model(hidden_size=32))


def test_mixed_directory_is_refused(bench_run, tmp_path):
    out, model = bench_run
    import shutil

    shutil.copytree(out, tmp_path / "mixed")
    config = json.loads((tmp_path / "mixed" / "generator_config.json").read_text())
    config["generator"]["rank"] = 3
    (tmp_path / "mixed" / "generator_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="disagree on the generator settings"):
        SyntheticGradientGenerator.from_pretrained(tmp_path / "mixed", model)


# --------------------------------------------------------------------------- pipeline


def _pipeline(bench_run):
    from prosg.data.text import BenchmarkTokenizer
    from prosg.pipeline import ProSG

    out, model = bench_run
    gen = _randomize_heads(SyntheticGradientGenerator.from_pretrained(out, model))
    return ProSG(model, gen, BenchmarkTokenizer())


def _prompts(n=3, seed=1):
    from prosg.data import MultiStageConfig, generate_examples

    return [e.prompt for e in generate_examples(MultiStageConfig(**DATA), n, seed=seed)]


def test_pipeline_equals_the_manual_steps(bench_run):
    pipe = _pipeline(bench_run)
    model, gen, tok = pipe.model, pipe.generator, pipe.tokenizer
    prompts = _prompts(3)
    assert len({len(tok.encode(p)) for p in prompts}) > 1  # different lengths in one batch
    texts, delta = pipe.generate(prompts, 12, return_delta=True)
    for b, prompt in enumerate(prompts):
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            one = gen(model, ids)
            # per-sample delta: row b of the batch's delta is this prompt's alone
            for name, (U, V) in one.factors.items():
                torch.testing.assert_close(delta.factors[name][0][b:b + 1], U, rtol=1e-5, atol=1e-6)
            _, state = model(ids[:, :-1])
            out = generate(model, ids[:, -1:], 12, one, state=state, stop_tokens=[tok.eos_id])[0, 1:].tolist()
        if tok.eos_id in out:
            out = out[: out.index(tok.eos_id)]
        assert texts[b] == tok.decode(out)
    # the delta changes the output, and steer=False is the base model
    base = pipe.generate(prompts, 12, steer=False)
    assert base != texts
    ids = torch.tensor([tok.encode(prompts[0])])
    with torch.no_grad():
        plain = generate(model, ids[:, -1:], 12, state=prefill(model, ids, [ids.shape[1] - 1]),
                         stop_tokens=[tok.eos_id])[0, 1:].tolist()
    assert base[0] == tok.decode(plain[: plain.index(tok.eos_id)] if tok.eos_id in plain else plain)


def test_stream_joins_to_generate_and_samples_reproducibly(bench_run):
    pipe = _pipeline(bench_run)
    prompts = _prompts(2, seed=4)
    steps = list(pipe.stream(prompts, 10))
    joined = ["".join(s[b] for s in steps) for b in range(2)]
    assert [" ".join(t.split()) for t in joined] == pipe.generate(prompts, 10)
    assert "".join(pipe.stream(prompts[0], 10)).strip() == pipe.generate(prompts[0], 10)
    a = pipe.generate(prompts, 10, temperature=0.9, top_k=5, do_sample=True, seed=3)
    assert a == pipe.generate(prompts, 10, temperature=0.9, top_k=5, do_sample=True, seed=3)
    with pytest.raises(ValueError, match="prompt 1 must be a non-empty string"):
        pipe.generate(["repeat A", "  "])


def test_cli_generate_prompt_and_file_forms(bench_run, tmp_path, capsys):
    out, model = bench_run
    base = tmp_path / "base"
    model.save_pretrained(base)
    prompt = _prompts(1)[0]
    args = ["generate", "--generator", str(out), "--base", str(base), "--max-new-tokens", "6", "--threads", "0"]
    assert main(args + ["--prompt", prompt, "--compare"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "=== prosg ===" and printed[2] == "=== base ===" and len(printed) == 4
    from prosg.pipeline import ProSG

    pipe = ProSG.from_pretrained(out, base=str(base))
    assert printed[1].strip() == pipe.generate(prompt, 6) and printed[3].strip() == pipe.generate(prompt, 6, steer=False)
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in _prompts(3)))
    assert main(args + ["--prompts", str(file), "--compare", "--batch-size", "2"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3] and all({"prosg", "base"} <= set(r) for r in records)
    assert records[0]["prosg"] == pipe.generate(_prompts(3)[0], 6)
    file.write_text('{"prompt": "repeat A"}\n{"text": "x"}\n')
    with pytest.raises(SystemExit, match=r"prompts.jsonl:2: missing field 'prompt'"):
        main(args + ["--prompts", str(file)])
    with pytest.raises(SystemExit, match="exactly one of --prompt"):
        main(args)
    with pytest.raises(SystemExit, match="run it first"):
        main(["generate", "--prompt", "x", "--generator", "prosg_demo/generator"] if not Path("prosg_demo").exists()
             else ["generate", "--prompt", "x", "--generator", str(tmp_path / "none")])


# --------------------------------------------------------------------------- user data


def _write_user_data(tmp_path, n=12, response_words=4, seed=0):
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    lines = [{"prompt": "Say: " + " ".join(rng.choice(WORDS) for _ in range(5)),
              "response": " " + " ".join(rng.choice(WORDS) for _ in range(response_words))} for _ in range(n)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    # a WordLevel tokenizer: one token per word, so every response has the same length
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<|endoftext|>", "[UNK]", "Say:", *sorted(set(WORDS))])},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(tmp_path / "tokenizer.json"))
    random_model(vocab_size=tok.get_vocab_size(), **TINY).save_pretrained(tmp_path / "base")
    return data, lines


def _bpe_tokenizer(path, texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "[UNK]"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return tok


USER = ["--rank", "2", "--hidden-size", "8", "--no-progress", "--threads", "0", "--device", "cpu"]


def test_train_generate_eval_on_a_user_jsonl_with_a_bpe_tokenizer(tmp_path, capsys, monkeypatch):
    data, lines = _write_user_data(tmp_path)
    tok = _bpe_tokenizer(tmp_path / "bpe.json", [l["prompt"] + l["response"] for l in lines] * 3)
    random_model(vocab_size=tok.get_vocab_size(), **TINY).save_pretrained(tmp_path / "bpebase")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--tokenizer", str(tmp_path / "bpe.json"), "--base",
                 str(tmp_path / "bpebase"), "--out", str(run), "--steps", "3", "--batch-size", "4",
                 "--chunk-length", "5", "--lr", "0.05", *USER]) == 0
    config = json.loads((run / "generator_config.json").read_text())
    assert config["tokenizer"]["kind"] == "tokenizers" and (run / "tokenizer.json").is_file()
    assert config["base_path"] == str((tmp_path / "bpebase").resolve())
    assert config["train_config"]["data_file"] == str(data.resolve())
    capsys.readouterr()
    # the base is found from the directory's record
    assert main(["generate", "--generator", str(run), "--prompt", "Say: the cat", "--max-new-tokens", "4",
                 "--threads", "0"]) == 0
    assert capsys.readouterr().out.strip()
    (tmp_path / "verif.py").write_text("def score(prompt, response, reference, record):\n"
                                       "    return float(set(response.split()) <= set(reference.split()))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["eval", "--data", str(data), "--generator", str(run), "--out", str(tmp_path / "ev"),
                 "--verifier", "verif:score", "--no-progress", "--threads", "0"]) == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["examples"] == 12 and set(report["loss"]) == {"base", "prosg"}
    bins = report["loss_by_position"]
    assert bins[0]["lo"] == 0 and sum(b["tokens"] for b in bins) == report["response_tokens"]
    assert all(0 <= v <= 1 for v in report["verifier"].values())
    # the per-position means average to the overall loss
    for m in ("base", "prosg"):
        weighted = sum(b[m] * b["tokens"] for b in bins) / report["response_tokens"]
        assert weighted == pytest.approx(report["loss"][m], rel=1e-6)
    with pytest.raises(SystemExit, match="no 'nothing'"):
        main(["eval", "--data", str(data), "--generator", str(run), "--out", str(tmp_path / "ev2"),
              "--verifier", "verif:nothing", "--threads", "0"])
    assert not (tmp_path / "ev2").exists()


def test_eval_loss_by_position_matches_a_direct_computation(tmp_path):
    from prosg.data.text import load_text_pairs, load_text_tokenizer
    from prosg.method.user_eval import evaluate_pairs

    data, _ = _write_user_data(tmp_path, n=3, response_words=3)
    tok = load_text_tokenizer(tmp_path / "tokenizer.json")
    pairs = load_text_pairs(data, tok)
    model = random_model(vocab_size=tok.vocab_size, **TINY)
    report = evaluate_pairs(model, None, pairs, tok, batch_size=2)
    # response = 3 words + <|endoftext|>: positions 0, 1, 2-3
    assert [(b["lo"], b["hi"], b["tokens"]) for b in report["loss_by_position"]] == [(0, 1, 3), (1, 2, 3), (2, 4, 6)]
    first = []
    for p in pairs:
        logits, _ = model(torch.tensor([p.prompt_ids]))
        first.append(float(torch.nn.functional.cross_entropy(logits[0, -1:], torch.tensor(p.response_ids[:1])).detach()))
    assert report["loss_by_position"][0]["base"] == pytest.approx(sum(first) / 3, rel=1e-5)


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "Say: the cat", "response": " a dog"', "invalid JSON"),
    ('{"prompt": "Say: the cat"}', "missing field 'response'"),
    ('{"prompt": "   ", "response": " a dog"}', "empty prompt"),
    ('{"prompt": "Say: ' + " ".join(["the"] * 40) + '", "response": " a dog"}', "leaves no room for a response"),
    ('{"prompt": "Say: the cat", "response": " a zebra"}', "unknown token"),
])
def test_malformed_user_data_names_the_line_and_loses_nothing(tmp_path, line, message):
    data, _ = _write_user_data(tmp_path, n=3)
    good = tmp_path / "run"
    argv = ["train", "--data", str(data), "--tokenizer", str(tmp_path / "tokenizer.json"), "--base",
            str(tmp_path / "base"), "--steps", "1", "--batch-size", "2", "--max-length", "20", *USER]
    assert main(argv + ["--out", str(good)]) == 0
    before = {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()}
    data.write_text(data.read_text() + line + "\n")
    with pytest.raises(SystemExit, match=rf"pairs.jsonl:4: .*{message}"):
        main(argv + ["--out", str(good), "--overwrite"])
    # the earlier run is untouched (the data is checked before anything is replaced)
    assert {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()} == before
    with pytest.raises(SystemExit, match=r"pairs.jsonl:4"):
        main(argv + ["--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()


def test_truncate_response_cuts_and_drops_the_eos(tmp_path):
    from prosg.data.text import encode_pair, load_text_tokenizer

    _write_user_data(tmp_path, n=1)
    tok = load_text_tokenizer(tmp_path / "tokenizer.json")
    pair = encode_pair(tok, "Say: the cat", " a dog ran up", max_length=6, truncate="response")
    assert len(pair.prompt_ids) == 3 and pair.response_ids == tok.encode(" a dog ran")
    with pytest.raises(ValueError, match=r"3 \+ 5 tokens, over --max-length 6"):
        encode_pair(tok, "Say: the cat", " a dog ran up", max_length=6)


def test_world_tokenizer_round_trip():
    pytest.importorskip("rwkv")
    from prosg.data.text import load_text_tokenizer, tokenizer_from_spec

    tok = load_text_tokenizer("rwkv-world")
    ids = tok.encode("Hello, wörld! 你好")
    assert tok.decode(ids) == "Hello, wörld! 你好" and tok.eos_id == 0 and max(ids) < tok.vocab_size
    assert tokenizer_from_spec(tok.spec()).encode("Hello") == tok.encode("Hello")
    with pytest.raises(ValueError, match="differ from the ones the generator was trained with"):
        tokenizer_from_spec({**tok.spec(), "sha256": "0" * 64})


def test_chunked_checkpointed_and_bfloat16_losses():
    """Chunks with the state carried give the loss and the gradient of one piece;
    checkpointing recomputes the same; the bfloat16 base stays close to float32."""
    from prosg.method.train import _Objective, make_batch
    from prosg.data import MultiStageConfig

    model = _bench_model()
    for p in model.parameters():
        p.requires_grad_(False)
    gen = _randomize_heads(SyntheticGradientGenerator(model, GeneratorConfig(rank=2, hidden_size=8)))
    batch = make_batch(MultiStageConfig(**DATA), 0, range(3))

    def loss_and_grad(**kw):
        gen.zero_grad()
        delta = gen(model, batch.prompt_ids, batch.prompt_mask)
        loss = response_loss(model, batch, delta, **kw)
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.flatten() for p in gen.parameters() if p.grad is not None])

    whole, g_whole = loss_and_grad()
    for kw in (dict(chunk_length=3), dict(chunk_length=2, checkpointing=True)):
        loss, g = loss_and_grad(**kw)
        assert loss == pytest.approx(whole, rel=1e-5)
        torch.testing.assert_close(g, g_whole, rtol=1e-4, atol=1e-6)
    assert batch.response_ids.shape[1] > 3  # more than one chunk ran
    cfg = TrainConfig(precision="bfloat16", chunk_length=4)
    model.to_dtype(torch.bfloat16)
    loss = _Objective(gen, model, cfg)(batch, None)
    loss.backward()
    assert abs(float(loss) - whole) < 0.05 * whole
    assert all(p.dtype == torch.float32 for p in gen.parameters())


def test_bfloat16_training_records_the_float32_identity(tmp_path):
    model = _bench_model()
    from prosg.method.train import base_identity

    identity = base_identity(model)
    cfg = TrainConfig(steps=1, batch_size=2, data=DATA, generator=dict(rank=2, hidden_size=8), precision="bfloat16")
    train(model, cfg, tmp_path, progress=False)
    assert model.dtype == torch.bfloat16
    assert json.loads((tmp_path / "generator_config.json").read_text())["base_model"] == identity


# --------------------------------------------------------------------------- PEFT


def test_export_lora_reproduces_prosg_logits_in_transformers_and_peft(tmp_path, capsys):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import RwkvForCausalLM

    # rescale_every=1 on 3 layers: the output/value factors of blocks 1, 2 carry 2^-1, 2^-2
    model = random_model(vocab_size=104, hidden_size=24, num_hidden_layers=3, intermediate_size=40, rescale_every=1)
    model.save_pretrained(tmp_path / "base")
    gen = _randomize_heads(SyntheticGradientGenerator(model, GeneratorConfig(rank=3, hidden_size=8, scale=0.7)))
    from prosg.data.text import BenchmarkTokenizer

    gen.save_pretrained(tmp_path / "gen", model, tokenizer=BenchmarkTokenizer())
    prompt = _prompts(1)[0]
    assert main(["export-lora", "--generator", str(tmp_path / "gen"), "--base", str(tmp_path / "base"),
                 "--prompt", prompt, "--out", str(tmp_path / "adapter"), "--threads", "0"]) == 0
    assert "rank 3, 21 matrices, scale 0.7" in capsys.readouterr().out
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 3 and adapter["lora_alpha"] == pytest.approx(2.1)
    hf = RwkvForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.tensor([BenchmarkTokenizer().encode(prompt)])
    with torch.no_grad():
        delta = gen(model, ids)
        want, _ = model(ids, delta=delta)
        got = peft_model(ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(ids).logits
    assert (want - plain).abs().max() > 0.1  # the delta matters here
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(SystemExit, match="already holds an adapter"):
        main(["export-lora", "--generator", str(tmp_path / "gen"), "--base", str(tmp_path / "base"),
              "--prompt", prompt, "--out", str(tmp_path / "adapter"), "--threads", "0"])


# --------------------------------------------------------------------------- torchrun


def test_two_gloo_processes_equal_one_process_with_twice_the_batch(tmp_path):
    """torchrun --nproc-per-node 2 with batch b gives the first update of one process
    with batch 2b (responses of equal length, so the per-rank token means average to
    the global one)."""
    data, _ = _write_user_data(tmp_path, n=8)
    common = ["--data", str(data), "--tokenizer", str(tmp_path / "tokenizer.json"), "--base", str(tmp_path / "base"),
              "--steps", "1", "--warmup-steps", "0", "--lr", "0.05", *USER]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(_free_port()), "-m", "prosg", "train", "--out", str(tmp_path / "ddp"),
                          "--batch-size", "2", *common], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert main(["train", "--out", str(tmp_path / "one"), "--batch-size", "4", *common]) == 0
    from prosg.method.train import read_checkpoint

    a, _ = read_checkpoint(tmp_path / "ddp" / GENERATOR)
    b, _ = read_checkpoint(tmp_path / "one" / GENERATOR)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    ddp_log = [json.loads(line) for line in (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()]
    one_log = [json.loads(line) for line in (tmp_path / "one" / "train_log.jsonl").read_text().splitlines()]
    # rank 0's loss is over its half; the gradients (hence the update) are the global batch's
    assert ddp_log[0]["grad_norm"] == pytest.approx(one_log[0]["grad_norm"], rel=1e-4)
    assert one_log[0]["grad_norm"] > 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- main-job safety


def test_demo_without_matplotlib_still_writes_the_reports(tmp_path, monkeypatch, caplog):
    base = tmp_path / "base"
    _bench_model().save_pretrained(base)
    out = tmp_path / "demo"
    out.mkdir()
    (out / "forgetting.png").write_bytes(b"an earlier run's plot")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    argv = ["demo", "--base", str(base), "--out", str(out), "--steps", "1", "--n", "2", "--test-seeds", "1",
            "--batch-size", "2", "--rank", "2", "--hidden-size", "8", "--stage-length", "3", "--ramble-length", "3",
            "--max-stages", "3", "--no-progress", "--threads", "0", "--overwrite", "--tg-lr", "0.1"]
    with caplog.at_level("WARNING"):
        assert main(argv) == 0
    assert json.loads((out / "report.json").read_text())["methods"]["prosg"]["overall"]["examples"] == 2
    assert (out / "report.md").is_file() and not (out / "forgetting.png").exists()
    assert sum("matplotlib is not installed" in r.message for r in caplog.records) == 2  # before work, at the plot


def test_missing_required_package_fails_before_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(SystemExit, match="train needs the package.s. safetensors"):
        main(["train", "--out", str(tmp_path / "run"), "--steps", "1", "--threads", "0"])
    assert not (tmp_path / "run").exists()


def test_non_tty_output_has_no_progress_bars(tmp_path):
    base = tmp_path / "base"
    _bench_model().save_pretrained(base)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "prosg", "train", "--base", str(base), "--out", str(tmp_path / "r"),
                          "--steps", "2", "--batch-size", "2", "--rank", "2", "--hidden-size", "8", "--log-every", "1",
                          "--stage-length", "3", "--ramble-length", "3", "--max-stages", "3", "--threads", "1"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stderr and "prosg train:" not in run.stderr  # no bar on a pipe
    lines = run.stderr.splitlines()
    assert sum(" step " in line for line in lines) == 2 and all(line[:4].isdigit() for line in lines)


def test_log_lines_and_a_bar_do_not_garble_each_other():
    """Inside console_logging, a log line goes through tqdm.write (the bar is cleared
    and redrawn around it), not straight onto the bar's line."""
    import io
    import logging

    from tqdm import tqdm

    from prosg.method.cli import console_logging

    with console_logging():
        handlers = logging.getLogger().handlers
        assert any(type(h).__name__ == "_TqdmLoggingHandler" for h in handlers), handlers
        stream = io.StringIO()
        with tqdm(total=2, file=stream, disable=False) as bar:
            handler = next(h for h in handlers if type(h).__name__ == "_TqdmLoggingHandler")
            handler.stream = stream
            bar.update(1)
            logging.getLogger("prosg.test").warning("a log line")
    import re

    # tqdm.write clears the bar's line (\r, blanks, \r), writes the line, redraws the bar
    line = next(seg for seg in stream.getvalue().split("\n") if "a log line" in seg)
    assert re.fullmatch(r".*\r *\ra log line", line), repr(line)
    assert "it/s]" not in line.split("\r")[-1]


# --------------------------------------------------------------------------- selftest, README


def test_selftest_passes_and_catches_a_wrong_op(capsys, monkeypatch):
    assert main(["selftest"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 5 and all(line.endswith("ok") for line in lines)
    import prosg

    real = prosg.ops.lowrank_linear
    monkeypatch.setattr(prosg.ops, "lowrank_linear", lambda *a, **k: real(*a, **k) + 1e-2)
    with pytest.raises(SystemExit, match="cpu lowrank_linear differ"):
        main(["selftest"])


def _readme_block(title: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split(title, 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_setup_commands_are_short_and_call_selftest():
    install = _readme_block("**1. Install and run**")
    assert len(install) == 1 and len(install[0]) < 300, install
    assert install[0].startswith("python3.11 -m venv .venv && . .venv/bin/activate && pip install torch==2.14.1 ninja "
                                 "wheel && MAX_JOBS=2 pip install --no-build-isolation -e \".[")
    assert "prosg selftest" in install[0] and install[0].endswith("prosg demo --quick")
    assert "python -c" not in install[0]


def test_readme_use_prosg_on_your_model_commands_run(tmp_path, capsys):
    """Runs the README's "Use ProSG on your model" commands as written, in a folder
    with tiny versions of their inputs, overriding only the sizes."""
    commands = _readme_block("## Use ProSG on your model")
    assert [c.split()[1] for c in commands] == ["train", "generate", "eval", "export-lora"]
    data, lines = _write_user_data(tmp_path, n=6)
    # byte-level BPE (as the 20B tokenizer): any prompt text encodes
    tok = _bpe_tokenizer(tmp_path / "20B_tokenizer.json", [l["prompt"] + l["response"] for l in lines] * 3)
    random_model(vocab_size=tok.get_vocab_size(), **TINY).save_pretrained(tmp_path / "my-rwkv4")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Say: the cat"}\n')
    (tmp_path / "my_verifier.py").write_text("def score(prompt, response, reference, record):\n    return 1.0\n")
    small = {"train": ["--steps", "2", "--batch-size", "2", "--rank", "2", "--hidden-size", "8", "--no-progress"],
             "generate": ["--max-new-tokens", "3"], "eval": ["--no-progress", "--batch-size", "3"], "export-lora": []}
    cwd = os.getcwd()
    sys.path.insert(0, str(tmp_path))
    try:
        os.chdir(tmp_path)
        import shlex

        for command in commands:
            argv = shlex.split(command)[1:]
            assert main(argv + small[argv[0]] + ["--threads", "0"]) == 0, command
    finally:
        os.chdir(cwd)
        sys.path.remove(str(tmp_path))
    assert (tmp_path / "my-run" / "generator_config.json").is_file()
    assert (tmp_path / "my-eval" / "report.json").is_file()
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
