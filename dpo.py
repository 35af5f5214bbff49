"""
Stage 3: Direct Preference Optimisation (DPO) on image/video preference pairs. train.py runs it
through its one training loop (stage=3): only the batch loss differs from stages 1-2.

    loss = -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

pi / ref are the SUMMED log-probs of the answer tokens (chosen c, rejected r) under the policy and
the frozen reference (the stage-2 model). At step 0 the policy is the reference, so the loss
is ln 2.

One DINOv2 encode per sample serves both answers: a stage-3 sample has two text rows, chosen then
rejected (data.ShardDataset.text_rows), so a batch holds 2B rows (chosen_0, rejected_0, chosen_1,
...; owner says whose), one forward.
"""
import copy
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data


def sequence_logps(logits, ids, mask):
    """logits [n,V] of the n target positions in (row, position) order (model.forward with a loss
    mask, as model.text_loss orders them), ids/mask [R,S] ->
    summed log-prob of the target tokens [R] (mask[i] = 1 marks token i as a target) and the number
    of targets [R]."""
    target = mask[:, 1:].bool()  # [R,S-1]
    ce = F.cross_entropy(logits.float(), ids[:, 1:][target], reduction='none')
    rows = target.nonzero()[:, 0]
    logps = torch.zeros(ids.shape[0], device=logits.device).index_add(0, rows, -ce)
    return logps, target.sum(1)


def answer_logps(model, batch, mode):
    """Summed log-probs [B,2] (chosen, rejected) of both answers of every sample and their target
    counts [B,2]. `model` may be the DDP wrapper (its forward is what runs)."""
    # only the targets go through lm_head and the vocab-wide softmax:
    # answers are a fraction of the sequence
    logits, _ = model(batch['frames'], batch['input_ids'], batch['loss_mask'], batch['frame_mask'],
                      mode=mode, **data.row_keywords(batch))  # [n,V]
    logps, counts = sequence_logps(logits, batch['input_ids'], batch['loss_mask'])
    return logps.view(-1, 2), counts.view(-1, 2)


def make_reference(model):
    """The frozen reference: a copy of the initial policy, in eval(), only run under no_grad. Make
    it before torch.compile wraps methods of `model`."""
    # frozen by running under no_grad:
    # with requires_grad off CPU kernels differ by ~1e-6 from the policy's
    return copy.deepcopy(model).eval()


@torch.no_grad()
def precompute_reference(model, dataset, device, autocast=nullcontext(), mode='coarse_fine',
                         batch_size=8):
    """One pass of the (initial) model over a non-looping stage-3 ShardDataset ->
    {sample key: [ref_c, ref_r]}, the `ref` that batch_loss takes. Under DDP every rank scores its
    share of the shards and the tables are merged, so that every rank can look up any sample (the
    shard order changes between epochs)."""
    was_training = model.training
    model.eval()
    table, repeated = {}, set()
    master = not dist.is_initialized() or dist.get_rank() == 0
    loader = data.make_loader(dataset, batch_size)
    progress = tqdm(loader, desc='dpo: reference log-probs', disable=not master, dynamic_ncols=True)
    for batch in progress:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with autocast:
            logps, _ = answer_logps(model, batch, mode)
        for key, lp in zip(batch['keys'], logps.float().cpu()):
            if key in table:
                repeated.update([key])
            table[key] = lp
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, table)
        table = {}
        for part in parts:
            repeated.update(table.keys() & part.keys())
            table.update(part)
    if repeated:
        raise ValueError(f"dpo.py: {len(repeated)} sample keys occur more than once in the DPO "
                         f"shards (e.g. {sorted(repeated)[0]!r}): precompute_ref needs unique "
                         f"keys; make them unique or use precompute_ref=False")
    model.train(was_training)
    return table


def reference_logps(ref, batch, mode):
    """[B,2] reference log-probs: from the frozen model, or precompute_reference's table"""
    if isinstance(ref, dict):
        missing = [k for k in batch['keys'] if k not in ref]
        if missing:
            raise KeyError(f"dpo.py: sample {missing[0]!r} is not in the precomputed reference; "
                           f"precompute over the same train_data (or use precompute_ref=False)")
        return torch.stack([ref[k] for k in batch['keys']]).to(batch['frames'].device)
    with torch.no_grad():
        return answer_logps(ref, batch, mode)[0].float()


def batch_loss(model, ref, batch, beta=0.1, label_smoothing=0.0, sft_weight=0.0,
               mode='coarse_fine'):
    """DPO loss of one micro-batch (data.collate's stage-3 dict, on device) and its metrics (0-dim
    tensors). model: the policy or its DDP wrapper (the forward goes through it, so gradients sync);
    ref: make_reference's model or precompute_reference's table. label_smoothing > 0: conservative
    DPO (the label is flipped with that probability). sft_weight > 0 adds sft_weight * the mean CE
    of the chosen answers' tokens."""
    policy, counts = answer_logps(model, batch, mode)  # [B,2]
    reference = reference_logps(ref, batch, mode)  # [B,2]
    rewards = beta * (policy.float() - reference).detach()  # [B,2] implicit rewards, for metrics
    # [B] how much more the policy prefers chosen over rejected than the reference does
    margin = beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    loss = losses.mean()
    metrics = {'rewards/chosen': rewards[:, 0].mean(), 'rewards/rejected': rewards[:, 1].mean(),
               'rewards/accuracies': (rewards[:, 0] > rewards[:, 1]).float().mean(),
               'rewards/margins': (rewards[:, 0] - rewards[:, 1]).mean(),
               'logps/chosen': policy[:, 0].detach().mean(),
               'logps/rejected': policy[:, 1].detach().mean()}
    if sft_weight > 0:  # token-weighted, as model.forward's CE
        sft = -policy[:, 0].sum() / counts[:, 0].sum().clamp(min=1)
        metrics['loss/dpo'], metrics['loss/sft'] = loss.detach(), sft.detach()
        loss = loss + sft_weight * sft
    return loss, metrics
