"""train.py end to end on a tiny shapes dataset: resume, DDP, atomic checkpoints, NaN, schedules, compile, chains."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import shutil

import pytest
import torch

import tasks.shapes
from model import DINOv2, DinoConfig, FoveatedVLM, LLMConfig, SmolLM2, load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--tiny_llm_dim=32', '--tiny_llm_layers=1', '--tiny_llm_heads=2', '--tiny_llm_kv_heads=1', '--tiny_llm_hidden=64',
        '--tiny_dino_dim=32', '--tiny_dino_layers=1', '--tiny_dino_heads=2', '--tiny_patch_size=8', '--image_size=32',
        '--batch_size=4', '--max_frames=4', '--log_interval=1', '--eval_interval=1000', '--mcq_data=',
        '--eval_iters=1', '--warmup_iters=2', '--num_workers=1', '--eval_modes=coarse_fine']


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    path = tmp_path_factory.mktemp('shapes')
    tasks.shapes.make_shapes(path, n_train=64, n_val=8, n_dpo=16, n_text=16, image_size=32, frames=4, shard_size=16)
    return path


def train(shapes, out, *args, nproc=1, check=True):
    cmd = [sys.executable, 'train.py'] if nproc == 1 else \
        [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--master_port=29517', 'train.py']
    cmd += TINY + [f'--shapes_dir={shapes}', f'--train_data={shapes}/train-*.tar', f'--val_data={shapes}/val-*.tar',
                   f'--text_data={shapes}/text-*.tar', f'--out_dir={out}', *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(out):
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_resume_is_bit_exact_and_schedule(shapes, tmp_path):
    train(shapes, tmp_path / 'full', '--max_iters=6', '--ckpt_interval=3', '--lr_connector=2e-3')
    train(shapes, tmp_path / 'half', '--max_iters=3', '--lr_decay_iters=6', '--ckpt_interval=3', '--lr_connector=2e-3')
    shutil.copytree(tmp_path / 'half', tmp_path / 'other')
    train(shapes, tmp_path / 'half', '--max_iters=6', '--init_from=resume', '--ckpt_interval=3', '--lr_connector=2e-3')
    full, half = metrics(tmp_path / 'full'), metrics(tmp_path / 'half')
    assert [r['iter'] for r in half] == [1, 2, 3, 4, 5, 6]
    assert [r['loss'] for r in half] == [r['loss'] for r in full]  # bit-exact, not approximately
    # cosine: warmup (it+1)/warmup, then cosine from base to base*min_lr_ratio over max_iters
    for r in full:
        it, base = r['iter'] - 1, 2e-3
        want = base * (it + 1) / 2 if it < 2 else base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (it - 2) / 4)))
        assert r['lr_connector'] == pytest.approx(want, rel=1e-9)
    assert full[0]['lr_llm'] > 0  # the first step does not run at LR 0
    # a resumed run takes its LR keys from the command line, and says which keys changed
    # (three saves after the resume: rotation deletes the checkpoint it resumed from, whose
    # tokenizer.json the third save needs)
    proc = train(shapes, tmp_path / 'other', '--max_iters=6', '--init_from=resume', '--lr_decay_iters=6',
                 '--lr_connector=4e-3', '--ckpt_interval=1')
    assert "lr_connector=0.004 (was 0.002)" in proc.stdout
    want = 4e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 1 / 4)))
    assert next(r for r in metrics(tmp_path / 'other') if r['iter'] == 4)['lr_connector'] == pytest.approx(want, rel=1e-9)
    steps = sorted(os.listdir(tmp_path / 'other' / 'ckpt'))
    assert steps == ['step-0000005', 'step-0000006']
    assert all(os.path.isfile(tmp_path / 'other' / 'ckpt' / s / 'tokenizer.json') for s in steps)
    # another reader split would read other samples: refused, with what to do
    proc = train(shapes, tmp_path / 'other', '--max_iters=5', '--init_from=resume', '--num_workers=2', check=False)
    assert proc.returncode == 1 and 'resume with the same --num_workers' in proc.stderr
    for key in ('loss', 'grad_norm', 'samples_per_sec', 'tokens_per_sec', 'mfu', 'skipped_samples', 'lr_dino'):
        assert key in full[-1]


def test_converging_schedule(shapes, tmp_path):
    train(shapes, tmp_path, '--max_iters=6', '--schedule=converging', '--target_lr=3e-5', '--ckpt_interval=100', '--lr_connector=2e-3')
    rows = metrics(tmp_path)
    for r in rows:
        it = r['iter'] - 1
        for name, base in (('connector', 2e-3), ('llm', 1e-3)):
            c = 0.5 * (1 + math.cos(math.pi * (it - 2) / 4))
            want = base * (it + 1) / 2 if it < 2 else 3e-5 + (base - 3e-5) * c
            assert r[f'lr_{name}'] == pytest.approx(want, rel=1e-9)


def test_ddp_equals_doubled_accumulation(shapes, tmp_path):
    # the same two readers in both runs: 2 ranks x 1 worker, or 1 rank x 2 workers
    train(shapes, tmp_path / 'ddp', '--max_iters=3', '--num_workers=1', '--ckpt_interval=100', nproc=2)
    train(shapes, tmp_path / 'one', '--max_iters=3', '--num_workers=2', '--gradient_accumulation_steps=2',
          '--ckpt_interval=100')
    ddp, one = metrics(tmp_path / 'ddp'), metrics(tmp_path / 'one')
    assert len(ddp) == 3
    for a, b in zip(ddp, one):
        assert a['loss'] == pytest.approx(b['loss'], abs=1e-5)
        assert a['grad_norm'] == pytest.approx(b['grad_norm'], abs=1e-5)


def test_ddp_every_mode_text_only_and_eval(shapes, tmp_path):
    # coarse_only never uses q_init / llm_to_query; eval runs on both ranks on its own schedule (not the log's)
    train(shapes, tmp_path / 'co', '--max_iters=3', '--train_mode=coarse_only', '--log_interval=1000',
          '--eval_interval=2', f'--mcq_data={shapes}/mcq_val.json', '--eval_modes=coarse_only,autoregressive',
          '--ckpt_interval=100', nproc=2)
    rows = metrics(tmp_path / 'co')
    assert [r['iter'] for r in rows] == [2, 3] and all('acc_autoregressive' in r and 'val_loss_coarse_only' in r
                                                       for r in rows)
    final = json.load(open(tmp_path / 'co' / 'final_eval.json'))
    assert final['count'] == 8  # every MCQ once, shared between the ranks
    # autoregressive training, and micro-batches without a single frame
    train(shapes, tmp_path / 'ar', '--max_iters=2', '--train_mode=autoregressive', '--text_ratio=1.0',
          '--val_data=', '--ckpt_interval=100', nproc=2)  # text_ratio 1: every sample is text-only
    assert all(math.isfinite(r['loss']) for r in metrics(tmp_path / 'ar'))
    bad = train(shapes, tmp_path / 'bad', '--train_mode=fast', check=False)
    assert bad.returncode == 1 and 'coarse_only, coarse_fine, autoregressive' in bad.stderr
    # no frames: said at start-up, not a run that skips every sample
    no_frames = train(shapes, tmp_path / 'bad', '--max_frames=0', check=False)
    assert no_frames.returncode == 1 and 'max_frames=0: every sample needs at least 1' in no_frames.stderr


def test_killed_save_leaves_a_loadable_checkpoint(shapes, tmp_path):
    cmd = [sys.executable, 'train.py', *TINY, f'--shapes_dir={shapes}', f'--train_data={shapes}/train-*.tar',
           '--val_data=', '--text_data=', f'--out_dir={tmp_path}', '--max_iters=100000', '--ckpt_interval=1',
           '--keep_last=3']
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / 'ckpt'
    deadline = time.time() + 120
    while time.time() < deadline and len(list(ckpt.glob('step-*'))) < 2:
        time.sleep(0.05)
    time.sleep(0.137)  # checkpoints are written every step: the kill lands in or near a save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = sorted(ckpt.glob('step-*'))
    assert steps, 'no checkpoint was written'
    for step in steps:  # every finished checkpoint loads, whatever the kill interrupted
        load_model(str(step))
        torch.load(step / 'train_state.pt', weights_only=True)
    (ckpt / '.tmp-step-9999999').mkdir(exist_ok=True)  # a half-written save is never picked up
    last = int(steps[-1].name.split('-')[1])
    proc = train(shapes, tmp_path, f'--max_iters={last + 1}', '--init_from=resume', '--val_data=', '--text_data=')
    assert f'resumed from {steps[-1]}' in proc.stdout + proc.stderr


def test_nan_stops_cleanly(shapes, tmp_path):
    proc = train(shapes, tmp_path, '--max_iters=50', '--ckpt_interval=1', '--lr_connector=1e9', '--lr_llm=1e9',
                 '--lr_dino=1e9', '--grad_clip=0.0', '--warmup_iters=0', check=False)
    assert proc.returncode == 1
    assert 'train.py: loss is' in proc.stderr and 'last good checkpoint' in proc.stderr
    assert 'Traceback' not in proc.stderr
    for step in (tmp_path / 'ckpt').glob('step-*'):
        load_model(str(step))


def test_compile_chain_and_bf16(shapes, tmp_path):
    proc = train(shapes, tmp_path / 's1', '--max_iters=2', '--stage=1', '--compile=True', '--dtype=bfloat16')
    assert int(proc.stdout.split('torch.compile: ')[1].split()[0]) > 0  # dynamo really compiled graphs
    assert all(math.isfinite(r['loss']) for r in metrics(tmp_path / 's1'))
    proc = train(shapes, tmp_path / 's2', '--max_iters=2', '--stage=2', f'--init_from={tmp_path / "s1"}')
    assert metrics(tmp_path / 's2')[0]['loss'] < 10
    missing = train(shapes, tmp_path / 's3', '--init_from=/no/such/ckpt', check=False)
    assert missing.returncode == 1 and 'no such checkpoint' in missing.stderr


def test_weight_decay_groups():
    torch.manual_seed(0)
    vlm = FoveatedVLM(SmolLM2(LLMConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                                        hidden_dim=64, max_seq_len=64)),
                      DINOv2(DinoConfig(image_size=32, patch_size=8, dim=32, n_layers=1, n_heads=2)))
    opt = vlm.configure_optimizers(0.1, {'connector': 1.0, 'steer': 5.0, 'dino': 2.0, 'dino_qk': 4.0, 'llm': 3.0})
    names = {id(p): n for n, p in vlm.named_parameters()}
    seen = {}
    for g in opt.param_groups:
        for p in g['params']:
            seen[names[id(p)]] = (g['name'], g['weight_decay'], g['lr'])
    assert set(seen) == set(names.values())  # every parameter exactly once (the tied lm_head is the embedding)
    no_decay = {n for n, (_, wd, _) in seen.items() if wd == 0}
    assert {'q_static', 'q_init', 'llm.embed_tokens.weight', 'dino.pos_embed', 'dino.cls_token', 'dino.blocks.0.ls1',
            'llm.norm.weight', 'dino.norm.bias', 'output_proj.bias'} <= no_decay
    assert {n for n, (_, wd, _) in seen.items() if wd == 0.1} == {n for n in seen if n.endswith('weight') and n not in no_decay}
    assert seen['query_input_proj.weight'] == ('connector', 0.1, 1.0) and seen['output_proj.weight'][0] == 'connector'
    assert seen['dino.patch_embed.weight'] == ('dino', 0.1, 2.0) and seen['llm.layers.0.mlp.up_proj.weight'][2] == 3.0
    # DINOv2's attention query/key projections (not values, not the glimpse's own query) have their own LR
    assert seen['dino.blocks.0.q.weight'] == ('dino_qk', 0.1, 4.0) and seen['dino.blocks.0.k.bias'] == ('dino_qk', 0.0, 4.0)
    assert {n for n, (g, _, _) in seen.items() if g == 'dino_qk'} == {f'dino.blocks.0.{m}.{w}' for m in 'qk' for w in ('weight', 'bias')}
    # where the LLM makes the glimpse look has its own LR too
    assert {n for n, (g, _, _) in seen.items() if g == 'steer'} == {'llm_to_query.weight', 'llm_to_query.bias', 'q_init'}
    assert seen['llm_to_query.weight'] == ('steer', 0.1, 5.0)
    # the original's recipe: decay on every parameter, output_proj with DINOv2, betas (0.9, 0.999)
    opt = vlm.configure_optimizers(0.1, {'connector': 1.0, 'steer': 5.0, 'dino': 2.0, 'dino_qk': 4.0, 'llm': 3.0}, (0.9, 0.999),
                                   decay='all', output_proj_group='dino')
    by_name = {names[id(p)]: g for g in opt.param_groups for p in g['params']}
    assert all(g['weight_decay'] == 0.1 and g['betas'] == (0.9, 0.999) for g in opt.param_groups)
    assert by_name['output_proj.weight']['name'] == by_name['output_proj.bias']['name'] == 'dino'
    assert by_name['q_static']['name'] == 'connector'
    fresh = FoveatedVLM(vlm.llm, vlm.dino, q_init_copies_static=False, llm_to_query_zero_init=False)
    assert not torch.equal(fresh.q_init, fresh.q_static) and fresh.llm_to_query.weight.abs().sum() > 0
