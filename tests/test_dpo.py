"""dpo.py: the DPO loss against a naive implementation, the shared chosen/rejected forward, the precomputed
reference, and a 2-process DDP run of train.py against 1 process with doubled accumulation. The DPO step's
cost against a stage-2 step is measured by `python bench.py --task=speed`."""
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import tasks.shapes  # noqa: E402
import dpo  # noqa: E402
from conftest import steered  # noqa: E402
from model import MODES, DINOv2, DinoConfig, FoveatedVLM, LLMConfig, SmolLM2  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_vlm(vocab=96, image_size=32, seed=0):
    torch.manual_seed(seed)
    llm = SmolLM2(LLMConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                            hidden_dim=96, max_seq_len=256))
    dino = DINOv2(DinoConfig(image_size=image_size, patch_size=8, dim=48, n_layers=2, n_heads=3))
    return steered(FoveatedVLM(llm, dino, seed=seed), seed)


def perturb(model, seed=1, scale=0.02):
    """the policy after some training: every weight moved a little"""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def pair_batch(B=3, T=3, size=32, vocab=96, seed=0):
    """a stage-3 batch like data.collate's (text rows chosen_0, rejected_0, ...; also chosen_/rejected_ ids
    and masks [B,S] for the oracle): a shared prompt, answers of different lengths, padded frames and text"""
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(B, T, 3, size, size, generator=g)
    frame_mask = torch.ones(B, T, dtype=torch.bool)
    for i in range(B):
        frame_mask[i, T - i % T:] = False  # shorter clips
    S = 16
    out = {'frames': frames, 'frame_mask': frame_mask, 'keys': [f'k{i}' for i in range(B)]}
    for k, lens in (('chosen', [(5, 8, 3)[i % 3] for i in range(B)]), ('rejected', [(7, 4, 9)[i % 3] for i in range(B)])):
        ids, mask = torch.full((B, S), 2), torch.zeros(B, S, dtype=torch.long)
        for i in range(B):
            prompt = torch.randint(3, vocab, (4,), generator=torch.Generator().manual_seed(100 + i))  # same in both
            answer = torch.randint(3, vocab, (lens[i],), generator=g)
            ids[i, :4 + lens[i]] = torch.cat((prompt, answer))
            mask[i, 4:4 + lens[i]] = 1
        out[f'{k}_ids'], out[f'{k}_mask'] = ids, mask
    two = lambda a, b: torch.stack((a, b), 1).flatten(0, 1)  # noqa: E731  rows chosen_0, rejected_0, chosen_1, ...
    out['input_ids'], out['loss_mask'] = two(out['chosen_ids'], out['rejected_ids']), two(out['chosen_mask'],
                                                                                        out['rejected_mask'])
    out['owner'] = torch.arange(B).repeat_interleave(2)
    return out


def naive_logps(model, batch, which, mode):
    """summed answer log-probs from a separate forward (its own encode and coarse pass), log_softmax + gather"""
    ids, mask = batch[f'{which}_ids'], batch[f'{which}_mask']
    logits, _ = model(batch['frames'], ids, None, batch['frame_mask'], mode=mode)
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # [B,S-1]
    return (logp * mask[:, 1:]).sum(1), mask[:, 1:].sum(1)


def naive_loss(policy, ref, batch, beta, label_smoothing, sft_weight, mode):
    pc, nc = naive_logps(policy, batch, 'chosen', mode)
    pr, _ = naive_logps(policy, batch, 'rejected', mode)
    with torch.no_grad():
        rc, _ = naive_logps(ref, batch, 'chosen', mode)
        rr, _ = naive_logps(ref, batch, 'rejected', mode)
    z = beta * ((pc - rc) - (pr - rr))
    loss = (-(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)).mean()
    return loss + sft_weight * (-pc.sum() / nc.sum()), (pc, pr, rc, rr)


@pytest.mark.parametrize('mode', MODES)
def test_shared_forward_equals_separate_forwards(mode):
    model = tiny_vlm().eval()
    batch = pair_batch()
    with torch.no_grad():
        shared, _ = model(batch['frames'], batch['input_ids'], None, batch['frame_mask'], mode=mode,
                          owner=batch['owner'])  # [2B,S,V]
        chosen, _ = model(batch['frames'], batch['chosen_ids'], None, batch['frame_mask'], mode=mode)
        rejected, _ = model(batch['frames'], batch['rejected_ids'], None, batch['frame_mask'], mode=mode)
    assert shared.shape == (6, 16, 96)
    assert (shared[0::2] - chosen).abs().max() < 1e-5
    assert (shared[1::2] - rejected).abs().max() < 1e-5
    assert (chosen - rejected).abs().max() > 1e-2  # the rows really differ


def test_one_encode_and_one_coarse_pass_per_sample():
    model = tiny_vlm()
    batch = pair_batch()
    calls = {'dino': [], 'llm': []}
    hooks = [model.dino.patch_embed.register_forward_hook(lambda m, i, o: calls['dino'].append(i[0].shape[0])),
             model.llm.register_forward_hook(lambda m, i, kw, o: calls['llm'].append(kw['embeds'].shape[0]),
                                             with_kwargs=True)]
    dpo.batch_loss(model, dpo.make_reference(model), batch)
    for h in hooks:
        h.remove()
    n_frames = int(batch['frame_mask'].sum())
    # policy + reference: each one DINOv2 call over the real frames, a coarse pass of B rows, a fine pass of 2B
    assert calls == {'dino': [n_frames, n_frames], 'llm': [3, 6, 3, 6]}


def test_step0_loss_is_ln2_and_accuracy_0():
    model = tiny_vlm()
    ref = dpo.make_reference(model)
    assert not ref.training and all(p.requires_grad for p in model.parameters())
    loss, m = dpo.batch_loss(model, ref, pair_batch(), beta=0.1)
    loss.backward()
    assert all(p.grad is None for p in ref.parameters())  # frozen: no_grad, never part of the graph
    assert abs(loss.item() - math.log(2)) < 1e-4
    assert m['rewards/accuracies'].item() == 0.0
    assert m['rewards/margins'].item() == 0.0 and m['rewards/chosen'].item() == 0.0
    assert m['logps/chosen'].item() < 0 and all(v.dim() == 0 for v in m.values())


@pytest.mark.parametrize('label_smoothing,sft_weight,mode', [(0.0, 0.0, 'coarse_fine'), (0.1, 0.5, 'coarse_fine'),
                                                             (0.0, 0.0, 'coarse_only')])  # autoregressive: inference only
def test_loss_and_grads_match_naive(label_smoothing, sft_weight, mode):
    model = tiny_vlm()
    ref = dpo.make_reference(model)
    perturb(model)  # policy != reference, so rewards and gradients are not trivial
    batch = pair_batch()
    loss, m = dpo.batch_loss(model, ref, batch, beta=0.1, label_smoothing=label_smoothing, sft_weight=sft_weight,
                             mode=mode)
    loss.backward()
    ours = {n: p.grad for n, p in model.named_parameters()}  # None: unused in this mode (coarse_only: llm_to_query)
    model.zero_grad(set_to_none=True)
    expected, (pc, pr, rc, rr) = naive_loss(model, ref, batch, 0.1, label_smoothing, sft_weight, mode)
    expected.backward()
    assert abs(loss.item() - expected.item()) < 1e-5
    for n, p in model.named_parameters():
        assert (ours[n] is None) == (p.grad is None), n
        assert ours[n] is None or (ours[n] - p.grad).abs().max() < 1e-5, n
    assert ours['llm.embed_tokens.weight'].abs().sum() > 0 and ours['dino.patch_embed.weight'].abs().sum() > 0
    rc_, rr_ = 0.1 * (pc - rc).detach(), 0.1 * (pr - rr).detach()
    assert abs(m['rewards/chosen'].item() - rc_.mean().item()) < 1e-5
    assert abs(m['rewards/margins'].item() - (rc_ - rr_).mean().item()) < 1e-5
    assert m['rewards/accuracies'].item() == (rc_ > rr_).float().mean().item()
    assert abs(m['logps/rejected'].item() - pr.mean().item()) < 1e-4


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('shapes'))
    tasks.shapes.make_shapes(root, n_train=4, n_val=4, n_dpo=16, n_text=4, image_size=32, frames=3, shard_size=4)
    return root


def test_precompute_matches_live_reference(shapes):
    tok = data.load_tokenizer(shapes)
    model = tiny_vlm(vocab=tok.get_vocab_size())
    live = dpo.make_reference(model)

    def dataset(loop):
        return data.ShardDataset([os.path.join(shapes, 'dpo-*.tar')], tok, 3, image_size=32, max_frames=3, loop=loop)
    table = dpo.precompute_reference(model, dataset(False), 'cpu', batch_size=3)
    assert len(table) == 16 and model.training
    perturb(model)
    batches = data.make_loader(dataset(False), 5)  # other batch composition and padding than the table's
    for batch in batches:
        a, ma = dpo.batch_loss(model, live, batch)
        b, mb = dpo.batch_loss(model, table, batch)
        assert abs(a.item() - b.item()) < 1e-5
        for k in ma:
            assert abs(ma[k].item() - mb[k].item()) < 1e-5, k
    batch['keys'][0] = 'nope'
    with pytest.raises(KeyError, match='precompute'):
        dpo.batch_loss(model, table, batch)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_train(launcher, out_dir, shapes, **over):
    args = dict(stage=3, init_from='scratch', shapes_dir=shapes, train_data=os.path.join(shapes, 'dpo-*.tar'),
                val_data='', text_data='', mcq_data='', out_dir=out_dir, device='cpu', dtype='float32',
                image_size=32, max_frames=3, tiny_llm_dim=64, tiny_llm_layers=2, tiny_dino_layers=2,
                batch_size=2, max_iters=3, warmup_iters=1, lr_connector=1e-3, lr_dino=1e-3, lr_llm=1e-3,
                log_interval=1, eval_interval=1000, ckpt_interval=1000) | over
    cmd = launcher + [os.path.join(ROOT, 'train.py')] + [f'--{k}={v}' for k, v in args.items()]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in open(os.path.join(out_dir, 'metrics.jsonl'))]


def test_ddp_step_equals_one_process_with_doubled_accumulation(shapes, tmp_path):
    # the same global readers: 1 process x 2 workers (micro-step k <- worker k) = 2 ranks x 1 worker
    one = run_train([sys.executable], str(tmp_path / 'one'), shapes, num_workers=2, gradient_accumulation_steps=2)
    ddp = run_train([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                     f'--master_port={free_port()}'], str(tmp_path / 'ddp'), shapes, num_workers=1,
                    gradient_accumulation_steps=1)
    assert len(one) == len(ddp) == 3
    assert abs(one[0]['loss'] - math.log(2)) < 1e-4 and one[0]['rewards/accuracies'] == 0
    assert abs(one[-1]['loss'] - math.log(2)) > 1e-3  # the policy moved away from the reference
    # and with the reference precomputed: each rank scores its shards, the tables are merged across ranks
    pre = run_train([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                     f'--master_port={free_port()}'], str(tmp_path / 'pre'), shapes, num_workers=1,
                    gradient_accumulation_steps=1, precompute_ref=True)
    for a, b, c in zip(one, ddp, pre):
        for k in ('loss', 'grad_norm', 'rewards/chosen', 'rewards/margins', 'logps/chosen', 'logps/rejected'):
            assert abs(a[k] - b[k]) < 1e-5, (a['iter'], k, a[k], b[k])
            assert abs(a[k] - c[k]) < 1e-5, (a['iter'], k, a[k], c[k])
