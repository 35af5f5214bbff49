"""
Train a foveated VLM: stages 1-2 (next-token CE) and stage 3 (DPO, its batch loss is dpo.py's).

    python train.py                              # the embedded default: synthetic shapes on CPU
    python train.py config/stage2_135m.py        # the real recipe on one GPU
    torchrun --nproc_per_node=8 train.py config/stage2_135m.py   # DDP on many

Every global below is a config key: override with a config file and/or --key=value
(configurator.py). Why the embedded default's values are what they are: docs/LOG.md.
"""
import glob
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from bench import evaluate_mcq, format_table, mcq_results
from model import LAYOUTS, MODES, compile_model, find_checkpoint, load_model
from perf.flops import batch_flops, mfu, peak_flops
from perf.platform import compile_counts, setup, warn_slow_bf16
from tasks import shapes

# -----------------------------------------------------------------------------
# config: the embedded default (a tiny fVLM trained from scratch on the shapes task)
out_dir = 'out/shapes'
init_from = 'scratch'  # | 'resume' | our checkpoint (a dir, a run dir) | a .safetensors file
llm_dir = ''  # a Hugging Face SmolLM2 dir; with dino_dir also '': a tiny model from scratch
dino_dir = ''  # a Hugging Face DINOv2 dir
tokenizer = ''  # tokenizer.json; '' = the checkpoint's, llm_dir's, or the shapes task's
shapes_dir = 'data/shapes'  # the synthetic task, made if missing when the data globs point in
train_data = 'data/shapes/train-*.tar'  # globs, comma-separated
val_data = 'data/shapes/val-*.tar'
text_data = 'data/shapes/text-*.tar'  # text-only shards, mixed in at text_ratio
mcq_data = 'data/shapes/mcq_val.json'  # held-out MCQs bench.py's code scores at eval ('': none)
stage = 2  # 1: CE on all text, 2: CE on the answer, 3: DPO (dpo.py)
# tiny backbones used when llm_dir / dino_dir are empty
tiny_llm_dim, tiny_llm_layers, tiny_llm_heads, tiny_llm_kv_heads = 128, 4, 4, 2
tiny_llm_hidden = 384
tiny_dino_dim, tiny_dino_layers, tiny_dino_heads, tiny_patch_size = 96, 4, 4, 8
tiny_visual_scale = 20.0  # loud visual tokens: a from-scratch LLM reads them sooner than at 0.14
# data
image_size = 64
max_frames = 8  # frames sampled uniformly over a video (at least 1); with fps > 0 the cap
replicate_image_frames = data.IMAGE_FRAMES  # an image becomes this many frames
fps = 0.0  # video frames per second (up to max_frames); 0 = max_frames spread over the clip
max_text_len = 0  # tokens per sample; 0 = the stage's default (512 in stage 1, 1024 after)
text_ratio = 0.05
num_workers = 0  # on 2 cores a worker process takes a core from the compute threads
shuffle_buffer = 1000  # samples per reader
max_batch_frames = 0  # > 0: a batch closes early once its real frames would pass this many
source_prompts = {}  # {source: question} for an empty `user`, over data.SOURCE_PROMPTS
media_root = ''  # where annotation files' media paths start ('': each file's folder)
annotation_block = 1  # annotation rows dealt out together (write_shards' shard_size: its order)
# optimisation
batch_size = 16  # per rank, per micro-step
gradient_accumulation_steps = 1
max_iters = 1200  # 9-10.5 minutes on 2 CPU cores, data generation included (README)
warmup_iters = 50
lr_decay_iters = 0  # length of warmup + decay; 0 means max_iters
# connector and DINOv2 slow: at 2e-3 / 1e-3 Adam's noisy early steps erased where things are
lr_connector = 1e-4
lr_steer = 3e-3  # llm_to_query and q_init fast: at 1e-4 the glimpses hardly moved from q_static's
lr_dino = 1e-4
lr_dino_qk = 1e-3  # DINOv2's attention query/key weights fast: where the glimpse looks
lr_llm = 1e-3
schedule = 'cosine'  # warmup, then cosine to min_lr_ratio | 'converging': all groups -> target_lr
target_lr = 3e-5
min_lr_ratio = 0.1
weight_decay = 0.01
weight_decay_params = 'matrices'  # Linear/Conv weights | 'all': every parameter (the original)
beta1, beta2 = 0.9, 0.95  # AdamW (the original: 0.9, 0.999)
output_proj_group = 'connector'  # the LR group of the glimpse's output_proj (original: 'dino')
q_init_copies_static = True  # a fresh fine pass starts as the coarse pass (original: random)
llm_to_query_zero_init = True
grad_clip = 1.0
# coarse_only | coarse_fine | autoregressive. The embedded default trains the walk itself, so
# the question's state gets the gradient of every frame it steers (docs/LOG.md)
train_mode = 'autoregressive'
coarse_loss_weight = 0.3  # stages 1-2: the static glimpses answer too, so coarse_only stays trained
# of a fresh model: 'question_first' ([question][frames][answer]: the question steers the glimpses)
# | 'frames_first' ([frames][chat], the released fVLM-135M's; config/stage1_135m.py sets it)
layout = 'question_first'
# DPO (stage 3)
beta = 0.1
label_smoothing = 0.0
sft_weight = 0.0
precompute_ref = False
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'  # autocast dtype; weights stay fp32
compile = False
compile_dynamic = True  # frame counts and text lengths symbolic from the first compile
gradient_checkpointing = False
encode_chunk = 32  # frames per DINOv2 call: bounds activation memory on long videos
seed = 1337
# logging, eval, checkpoints
log_interval = 10
eval_interval = 500
eval_iters = 10  # val batches per rank, each scored in every eval mode
eval_modes = 'coarse_only,coarse_fine,autoregressive'
ckpt_interval = 500
keep_last = 2  # checkpoints kept in out_dir/ckpt; 0 = all
wandb_log = False
wandb_project = 'nanofvlm'
wandb_run_name = 'run'
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# _known (set by configurator.py): the config keys; `config` holds their values in this run
config = {k: v for k, v in globals().items() if k in _known}
# -----------------------------------------------------------------------------

ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ['LOCAL_RANK'])
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
else:
    rank, world_size = 0, 1
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else 'cpu'


def say(*args):
    if master:
        tqdm.write(' '.join(str(a) for a in args))


def fail(msg):
    if master:
        print(f"train.py: {msg}", file=sys.stderr)
    sys.exit(1)


for key, choices in (('dtype', ('float32', 'bfloat16')),  # float16 would need a GradScaler
                     ('train_mode', MODES), ('layout', LAYOUTS),
                     ('schedule', ('cosine', 'converging')),
                     ('weight_decay_params', ('matrices', 'all')),
                     ('output_proj_group', ('connector', 'dino'))):
    value = globals()[key]
    if value not in choices:
        fail(f"{key}={value!r}: choose one of {', '.join(choices)}")
if max_frames < 1:
    fail(f"max_frames={max_frames}: every sample needs at least 1 frame "
         f"(with fps > 0, max_frames is the cap)")
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]
if master:
    warn_slow_bf16(device, dtype, 'train.py')
autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
torch.manual_seed(seed)
ckpt_root = os.path.join(out_dir, 'ckpt')


def latest_checkpoint():
    try:
        return find_checkpoint(ckpt_root)  # the newest finished step-*, never a half-written .tmp-*
    except FileNotFoundError:
        return None


# -- data ---------------------------------------------------------------------
if master and any(g.startswith(shapes_dir) for g in (train_data + ',' + val_data).split(',') if g):
    shapes.ensure_shapes(shapes_dir)
if ddp:
    dist.barrier()  # rank 0 may have been generating the task

# -- model ----------------------------------------------------------------------
fresh = dict(seed=seed, q_init_copies_static=q_init_copies_static,  # a fresh model's connector
             llm_to_query_zero_init=llm_to_query_zero_init, layout=layout)


def tiny_model():
    """The embedded default's backbones from scratch: a few layers each, the shapes vocabulary."""
    vocab = data.load_tokenizer(tokenizer or shapes_dir).get_vocab_size()
    llm = (tiny_llm_dim, tiny_llm_layers, tiny_llm_heads, tiny_llm_kv_heads, tiny_llm_hidden)
    dino = (tiny_dino_dim, tiny_dino_layers, tiny_dino_heads, tiny_patch_size)
    vlm = shapes.tiny_model(vocab, image_size, llm, dino, tiny_visual_scale, **fresh)
    return vlm, os.path.join(shapes_dir, 'tokenizer.json')


def start_model(source):
    """The model a run starts from (model.load_model's rules), and its tokenizer.json."""
    if source == 'scratch' and not (llm_dir or dino_dir):
        return tiny_model()
    try:
        return load_model(source, llm_dir, dino_dir, **fresh)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))


resume_dir = None
if init_from == 'resume':
    resume_dir = latest_checkpoint()
    if resume_dir is None:
        fail(f"init_from='resume' but {ckpt_root} has no checkpoint; train first or use "
             f"--init_from=scratch")
    state = torch.load(os.path.join(resume_dir, 'train_state.pt'), map_location='cpu',
                       weights_only=True)
    model, tok_path = start_model(resume_dir)
    config['init_from'] = state['config']['init_from']  # where the run started: DPO's reference
else:
    # a run dir or a dir of step-*: its newest; config keeps it, so a resumed run finds its start
    if init_from != 'scratch' and os.path.isdir(init_from):
        try:
            init_from = config['init_from'] = find_checkpoint(init_from)
        except FileNotFoundError as e:
            fail(str(e))
    model, tok_path = start_model(init_from)
candidates = (tok_path, os.path.join(shapes_dir, 'tokenizer.json'))
tok_path = tokenizer or next((p for p in candidates if os.path.isfile(p)), 'tokenizer.json')
try:
    tok = data.load_tokenizer(tok_path)
except (FileNotFoundError, ValueError) as e:
    fail(f"{e}; set --tokenizer")
with open(tok_path, 'rb') as f:  # kept: rotation may delete the checkpoint it came from
    tok_bytes = f.read()
if model.layout != layout:  # our checkpoints keep the layout they were trained with
    say(f"layout: {model.layout} (the checkpoint's); --layout={layout} is for a fresh model")
model.encode_chunk = encode_chunk
model.to(device)
model.llm.gradient_checkpointing = gradient_checkpointing
raw_model = model
ref_model = None
# stage 3: the frozen reference, copied before compile wraps methods (precompute_ref: a table of
# its log-probs instead, built below)
if stage == 3:
    import dpo
    reference_start = start_model(config['init_from'])[0].to(device) if resume_dir else raw_model
    if not precompute_ref:
        ref_model = dpo.make_reference(reference_start)
if compile:
    compile_model(model, compile_dynamic)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)

lrs = {'connector': lr_connector, 'steer': lr_steer, 'dino': lr_dino, 'dino_qk': lr_dino_qk,
       'llm': lr_llm}
optimizer = raw_model.configure_optimizers(weight_decay, lrs, (beta1, beta2), weight_decay_params,
                                           output_proj_group)


def lr_at(it, base):
    """Linear warmup from base/warmup (the first step is not at LR 0), then cosine.
    cosine: base -> base*min_lr_ratio; converging: every group -> the shared target_lr."""
    if it < warmup_iters:
        return base * (it + 1) / warmup_iters
    progress = min(1.0, (it - warmup_iters) / max(1, (lr_decay_iters or max_iters) - warmup_iters))
    c = 0.5 * (1.0 + math.cos(math.pi * progress))
    floor = base * min_lr_ratio if schedule == 'cosine' else target_lr
    return floor + (base - floor) * c


def make_dataset(globs, loop):
    text = {}
    if loop and text_data:
        text = dict(text_ratio=text_ratio, text_globs=text_data.split(','))
    return data.ShardDataset(
        globs.split(','), tok, stage, image_size=image_size, max_frames=max_frames, fps=fps or None,
        replicate_image_frames=replicate_image_frames, seed=seed, loop=loop, rank=rank,
        world_size=world_size, shuffle_buffer=shuffle_buffer, max_len=max_text_len or None,
        prompts=source_prompts, layout=raw_model.layout, media_root=media_root,
        annotation_block=annotation_block, **text)


try:
    train_loader = data.make_loader(make_dataset(train_data, loop=True), batch_size, num_workers,
                                    max_batch_frames or None, pin_memory=device_type == 'cuda')
    iter_num = 0
    if resume_dir:
        optimizer.load_state_dict(state['optimizer'])
        train_loader.load_state_dict(state['loader'])
        torch.set_rng_state(state['rng_cpu'])
        if device_type == 'cuda' and 'rng_cuda' in state:
            torch.cuda.set_rng_state(state['rng_cuda'])
        iter_num = state['iter_num']
        # the checkpoint's moments; this run's LRs, betas, decay
        for group in optimizer.param_groups:
            group.update(base_lr=lrs[group['name']], betas=(beta1, beta2),
                         weight_decay=weight_decay if group['decays'] else 0.0)
        changed = [f"{k}={v!r} (was {state['config'].get(k)!r})" for k, v in config.items()
                   if k != 'init_from' and state['config'].get(k, v) != v]
        differ = "; these keys differ from the checkpoint's run, this run's values are used: "
        say(f"resumed from {resume_dir} at iter {iter_num}" + (differ + ", ".join(changed)
                                                               if changed else ""))
except ValueError as e:
    fail(str(e))
if stage == 3 and precompute_ref:
    ref_model = dpo.precompute_reference(reference_start, make_dataset(train_data, loop=False),
                                         device, autocast, mode=train_mode)


def batch_loss(batch):
    """Loss of one micro-batch (and DPO metrics in stage 3), the forward through the DDP wrapper."""
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
             for k, v in batch.items()}
    with autocast:
        if stage == 3:
            loss, metrics = dpo.batch_loss(model, ref_model, batch, beta, label_smoothing,
                                           sft_weight, train_mode)
        else:
            _, loss = model(batch['frames'], batch['input_ids'], batch['loss_mask'],
                            batch['frame_mask'], train_mode, **data.row_keywords(batch),
                            coarse_loss_weight=coarse_loss_weight)
            metrics = {}
    # DDP reduces every parameter's gradient: add those this mode or batch did not use, weight 0
    if ddp:
        loss = loss + 0.0 * sum(p.view(-1)[0] for p in raw_model.parameters())
    return loss, metrics


mcq_records = None


@torch.no_grad()
def evaluate():
    """Held-out loss per mode and, where there are MCQs, accuracy per mode through bench.py's
    scoring. Every rank takes part (its share of the val shards and the MCQs; the results are
    reduced), so no rank waits in a collective while another evaluates."""
    global mcq_records
    raw_model.eval()
    out = {}
    modes = [m for m in eval_modes.split(',') if m]
    if val_data and stage != 3:
        sums = torch.zeros(2, len(modes), device=device)  # summed loss, batches; per mode
        for i, batch in enumerate(data.make_loader(make_dataset(val_data, loop=False), batch_size)):
            if i >= eval_iters:
                break
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            kv = raw_model.encode(batch['frames'], batch['frame_mask'])  # serves every mode
            for j, m in enumerate(modes):
                with autocast:
                    _, loss = raw_model(None, batch['input_ids'], batch['loss_mask'],
                                        batch['frame_mask'], m, kv, **data.row_keywords(batch))
                sums[:, j] += torch.stack((loss.float(), torch.ones((), device=device)))
        if ddp:
            dist.all_reduce(sums)
        out.update({f'val_loss_{m}': (sums[0, j] / sums[1, j]).item()
                    for j, m in enumerate(modes) if sums[1, j]})
    if mcq_data:
        mcq_records = mcq_records or shapes.read(mcq_data, image_size)  # decoded once per run
        with autocast:
            res = evaluate_mcq(raw_model, tok, mcq_records[rank::world_size], modes, device,
                               progress=False)
        if ddp:
            parts = [None] * world_size
            dist.all_gather_object(parts, res['items'])
            res = mcq_results([item for part in parts for item in part], modes)
        out.update({f'acc_{m}': res['accuracy'][m] for m in modes}, mcq=res)
    raw_model.train()
    return out


def save_checkpoint(it):
    """Atomic: everything goes to a .tmp dir, renamed when complete; the last keep_last are kept."""
    loader_states = [train_loader.state_dict()]
    if ddp:
        loader_states = [None] * world_size
        dist.all_gather_object(loader_states, train_loader.state_dict())
    if not master:
        return
    loader_state = loader_states[0] | {  # the ranks' reader states, keyed by global reader id
        'readers': {g: s for part in loader_states for g, s in part['readers'].items()},
        'next_reader': {r: nxt for part in loader_states for r, nxt in part['next_reader'].items()}}
    final = os.path.join(ckpt_root, f'step-{it:07d}')
    tmp = os.path.join(ckpt_root, f'.tmp-step-{it:07d}')
    shutil.rmtree(tmp, ignore_errors=True)
    raw_model.save(tmp)
    with open(os.path.join(tmp, 'tokenizer.json'), 'wb') as f:
        f.write(tok_bytes)
    state = {'optimizer': optimizer.state_dict(), 'iter_num': it, 'loader': loader_state,
             'rng_cpu': torch.get_rng_state(), 'config': config}
    if device_type == 'cuda':
        state['rng_cuda'] = torch.cuda.get_rng_state()
    torch.save(state, os.path.join(tmp, 'train_state.pt'))
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for old in sorted(glob.glob(os.path.join(ckpt_root, 'step-*')))[:-keep_last]:
        shutil.rmtree(old)


def log(row):
    if not master:
        return
    row = {k: v for k, v in row.items() if k != 'mcq'}
    with open(os.path.join(out_dir, 'metrics.jsonl'), 'a') as f:
        f.write(json.dumps(row) + '\n')
    if wandb_run is not None:
        wandb_run.log(row, step=row['iter'])


# -- the loop -------------------------------------------------------------------
wandb_run = None
if master:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)
    if wandb_log:
        try:
            import wandb
            wandb_run = wandb.init(project=wandb_project, name=wandb_run_name, config=config)
        except ImportError:
            say("wandb_log=True but wandb is not installed: logging to metrics.jsonl only")
    params = sum(p.numel() for p in raw_model.parameters())
    say(f"model: {params / 1e6:.2f}M params, layout {raw_model.layout}, device {device}, "
        f"dtype {dtype}, {world_size} rank(s), batch "
        f"{batch_size}x{gradient_accumulation_steps}x{world_size}")
setup(device)  # perf/platform.py: TF32 on CUDA; on a CPU, freed memory stays in the heap
peak = peak_flops(device, ptdtype)
model.train()
batches = iter(train_loader)
bar = tqdm(total=max_iters, initial=iter_num, disable=not master, dynamic_ncols=True)
t_last, samples_since, tokens_since, flops_since = time.time(), 0, 0, 0.0
last_eval = {}
while iter_num < max_iters:
    lrs_now = {}
    for group in optimizer.param_groups:
        group['lr'] = lrs_now[group['name']] = lr_at(iter_num, group['base_lr'])
    loss_sum, metrics_sum = torch.zeros((), device=device), {}
    for micro in range(gradient_accumulation_steps):
        batch = next(batches)
        sync = not ddp or micro == gradient_accumulation_steps - 1  # all-reduce on the last only
        with (nullcontext() if sync else model.no_sync()):
            loss, metrics = batch_loss(batch)
            (loss / gradient_accumulation_steps).backward()
        loss_sum += loss.detach()
        for k, v in metrics.items():
            metrics_sum[k] = metrics_sum.get(k, 0.0) + v.detach()
        ids, question = batch['input_ids'], batch.get('question_ids', batch['input_ids'][:, :0])
        samples_since += len(batch['frames'])
        tokens_since += int(batch['frame_mask'].sum()) + ids.numel() + question.numel()
        flops_since += batch_flops(raw_model, batch, train_mode, stage == 3 and not precompute_ref,
                                   stage < 3 and coarse_loss_weight > 0)
    # mean over micro-steps and ranks, for logging
    logged = torch.stack([loss_sum] + list(metrics_sum.values())) / gradient_accumulation_steps
    if ddp:
        dist.all_reduce(logged, op=dist.ReduceOp.AVG)
    if not torch.isfinite(logged[0]):
        fail(f"loss is {logged[0].item()} at iter {iter_num}: stopping. The last good checkpoint "
             f"is {latest_checkpoint() or 'none (nothing was saved yet)'}; lower the LRs or use "
             f"grad_clip.")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float('inf'))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    bar.update(1)
    if compile and iter_num == 1:
        say("torch.compile: {graphs} graphs, {graph_breaks} breaks".format(**compile_counts()))
    do_eval = iter_num % eval_interval == 0 or iter_num == max_iters
    if iter_num % log_interval == 0 or do_eval:  # an eval gets a log row of its own iteration
        dt = time.time() - t_last
        row = {'iter': iter_num, 'loss': logged[0].item(),
               **{f'lr_{k}': v for k, v in lrs_now.items()},
               **{k: v.item() for k, v in zip(metrics_sum, logged[1:])},
               'grad_norm': grad_norm.item(), 'samples_per_sec': samples_since * world_size / dt,
               'tokens_per_sec': tokens_since * world_size / dt, 'mfu': mfu(flops_since, dt, peak),
               'skipped_samples': sum(train_loader.skipped().values())}
        if compile:  # a count that still grows late in a run means recompiles
            row.update({f'compiled_{k}': v for k, v in compile_counts().items()})
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lrs_now['llm']:.1e}",
                        sps=f"{row['samples_per_sec']:.1f}", tps=f"{row['tokens_per_sec']:.0f}",
                        mfu='n/a' if row['mfu'] is None else f"{100 * row['mfu']:.1f}%")
        if do_eval:
            last_eval = dict(evaluate(), iter=iter_num)
            row.update(last_eval)
            say(f"iter {iter_num}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                 if k.startswith(('val_', 'acc_'))))
        log(row)
        t_last, samples_since, tokens_since, flops_since = time.time(), 0, 0, 0.0
    if iter_num % ckpt_interval == 0 or iter_num == max_iters:
        save_checkpoint(iter_num)
bar.close()

final = last_eval if last_eval.get('iter') == iter_num else evaluate()  # every rank
if master:
    if skipped := train_loader.skipped():
        say("skipped samples: " + ", ".join(f"{k}: {v}" for k, v in skipped.items()))
    if 'mcq' in final:
        say("held-out MCQ accuracy (%) per question type and mode:\n" + format_table(final['mcq']))
        with open(os.path.join(out_dir, 'final_eval.json'), 'w') as f:
            json.dump({k: v for k, v in final['mcq'].items() if k != 'items'}, f, indent=2)
    say(f"checkpoint: {latest_checkpoint()}")
if ddp:
    dist.destroy_process_group()
