#!/usr/bin/env python3
"""A PyTorch trainer for `cohort client --exec`.

    cohort client --server HOST:7443 --ca ca.pem --cert client-1.pem --key client-1.key \\
        --examples 3000 \\
        --exec 'python3 client/examples/pytorch/train.py --partition 1/2 --limit 6000'

Each round the cohort client runs this script with two more arguments: the global
model (safetensors) and the path to write the update to. The script builds the
network the tensors describe (cohort's Fashion-MNIST layouts, named like PyTorch
nn.Linear state_dicts: `fc.weight [10,784]` + `fc.bias` for softmax regression,
`fc1.weight [H,784]`, `fc1.bias`, `fc2.weight [10,H]`, `fc2.bias` for the MLP),
loads the global weights, runs a few SGD steps on its share of Fashion-MNIST and
writes the update = trained - global, with the global model's tensor names, shapes
and order. A non-zero exit makes the client decline the round.

The safetensors files are read and written by the small functions below (Debian 12
has no python3-safetensors). They also keep the tensor order, which cohort
requires of an update and which `safetensors.torch.save_file` (it sorts by name)
would not.
"""
import argparse
import gzip
import json
import os
import struct
import sys
import time

import torch
from torch import nn

DATA_DIR = "/usr/share/datasets/fashion-mnist"
PIXELS = 28 * 28
CLASSES = 10


# ------------------------------------------------------------------ safetensors

def st_load(path, max_bytes=1 << 32):
    """-> list of (name, float32 tensor) in data order. Strict: F32 only, offsets
    contiguous and inside the file, shapes matching the byte counts."""
    if sys.byteorder != "little":
        raise ValueError("this reader handles little-endian hosts only")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes or len(data) < 8:
        raise ValueError("%s: not a safetensors file of a sensible size" % path)
    (hlen,) = struct.unpack("<Q", data[:8])
    if hlen > len(data) - 8:
        raise ValueError("%s: header length %d runs past the end of the file" % (path, hlen))
    header = json.loads(data[8:8 + hlen].decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("%s: the header is not a JSON object" % path)
    header.pop("__metadata__", None)
    base = 8 + hlen
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    out, pos = [], 0
    for name, info in entries:
        if info.get("dtype") != "F32":
            raise ValueError("%s: tensor %s has dtype %s; only F32 is supported"
                             % (path, name, info.get("dtype")))
        shape = [int(d) for d in info["shape"]]
        begin, end = (int(x) for x in info["data_offsets"])
        n = 1
        for d in shape:
            if d < 0:
                raise ValueError("%s: tensor %s has a negative dimension" % (path, name))
            n *= d
        if begin != pos or end - begin != 4 * n or base + end > len(data):
            raise ValueError("%s: tensor %s has bad data offsets [%d, %d)" % (path, name, begin,
                                                                              end))
        pos = end
        buf = bytearray(data[base + begin:base + end])
        t = torch.frombuffer(buf, dtype=torch.float32) if n else torch.zeros(0)
        out.append((name, t.reshape(shape)))
    if base + pos != len(data):
        raise ValueError("%s: %d bytes after the last tensor" % (path, len(data) - base - pos))
    return out


def st_save(path, tensors):
    """tensors: list of (name, tensor), written as F32 in this order, header padded
    to 8 bytes. Written to path.tmp, then renamed."""
    header, blobs, off = {}, [], 0
    for name, t in tensors:
        b = t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


# ------------------------------------------------------------------- the model

class Softmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(PIXELS, CLASSES)

    def forward(self, x):
        return self.fc(x)


class MLP(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.fc1 = nn.Linear(PIXELS, hidden)
        self.fc2 = nn.Linear(hidden, CLASSES)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def build(tensors):
    """The network whose state_dict has exactly these names and shapes."""
    shapes = {name: list(t.shape) for name, t in tensors}
    if set(shapes) == {"fc.weight", "fc.bias"}:
        net = Softmax()
    elif set(shapes) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}:
        net = MLP(shapes["fc1.weight"][0])
    else:
        raise ValueError("unknown model layout %s; expected fc.* (softmax) or fc1.*, fc2.* (MLP)"
                         % sorted(shapes))
    want = {k: list(v.shape) for k, v in net.state_dict().items()}
    if want != shapes:
        raise ValueError("tensor shapes %s do not match %s" % (shapes, want))
    net.load_state_dict({name: t for name, t in tensors}, strict=True)
    return net


# -------------------------------------------------------------------- the data

def read_idx(path, magic):
    with gzip.open(path, "rb") as f:
        data = f.read()
    (m,) = struct.unpack(">I", data[:4])
    if m != magic:
        raise ValueError("%s: magic %d, expected %d" % (path, m, magic))
    ndim = magic & 0xff
    dims = struct.unpack(">%dI" % ndim, data[4:4 + 4 * ndim])
    n = 1
    for d in dims:
        n *= d
    body = data[4 + 4 * ndim:]
    if len(body) != n:
        raise ValueError("%s: %d data bytes, header says %d" % (path, len(body), n))
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def load_slice(data_dir, part, nparts, limit):
    """Examples [start, end) of the first `limit` training examples, split into
    nparts equal contiguous shares (the file order is already shuffled)."""
    images = read_idx(os.path.join(data_dir, "train-images-idx3-ubyte.gz"), 2051)
    labels = read_idx(os.path.join(data_dir, "train-labels-idx1-ubyte.gz"), 2049)
    n = min(limit, images.shape[0]) if limit else images.shape[0]
    start, end = n * (part - 1) // nparts, n * part // nparts
    x = images[start:end].reshape(-1, PIXELS).to(torch.float32) / 255.0
    y = labels[start:end].to(torch.int64)
    return x, y


# ---------------------------------------------------------------------- main

def partition(s):
    try:
        i, n = (int(v) for v in s.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError("must be I/N, e.g. 1/2")
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError("must be I/N with 1 <= I <= N")
    return i, n


def positive(s):
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


def main(argv=None):
    """argv: the arguments (default sys.argv[1:]); the round comes from COHORT_ROUND."""
    ap = argparse.ArgumentParser(description="PyTorch trainer for `cohort client --exec`.")
    ap.add_argument("--partition", type=partition, default=(1, 1), metavar="I/N",
                    help="this client's share of the slice (default 1/1)")
    ap.add_argument("--limit", type=int, default=0, metavar="N",
                    help="use only the first N training examples (default: all 60000)")
    ap.add_argument("--steps", type=positive, default=50, help="SGD steps per round (default 50)")
    ap.add_argument("--batch", type=positive, default=32, help="minibatch size (default 32)")
    ap.add_argument("--lr", type=float, default=0.1, help="learning rate (default 0.1)")
    ap.add_argument("--seed", type=int, default=1, help="minibatch seed (default 1)")
    ap.add_argument("--threads", type=positive, default=1, help="torch threads (default 1)")
    ap.add_argument("--data-dir", default=DATA_DIR, help="Fashion-MNIST directory")
    ap.add_argument("global_model", help="global model (safetensors), given by cohort client")
    ap.add_argument("update", help="where to write the update, given by cohort client")
    a = ap.parse_args(argv)

    t0 = time.time()
    torch.set_num_threads(a.threads)
    rnd = int(os.environ.get("COHORT_ROUND", "0"))
    part, nparts = a.partition
    glob = st_load(a.global_model)
    net = build(glob)
    x, y = load_slice(a.data_dir, part, nparts, a.limit)
    if len(x) == 0:
        raise SystemExit("train.py: partition %d/%d of %d examples is empty" % (part, nparts,
                                                                                 a.limit))
    gen = torch.Generator().manual_seed(a.seed * 1000003 + part * 7919 + rnd)
    opt = torch.optim.SGD(net.parameters(), lr=a.lr)
    loss_fn = nn.CrossEntropyLoss()
    total = 0.0
    net.train()
    for _ in range(a.steps):
        idx = torch.randint(0, len(x), (a.batch,), generator=gen)
        opt.zero_grad()
        loss = loss_fn(net(x[idx]), y[idx])
        loss.backward()
        opt.step()
        total += loss.item()
    mean_loss = total / a.steps
    if mean_loss != mean_loss or mean_loss in (float("inf"), float("-inf")):
        raise SystemExit("train.py: training diverged (loss %s); lower --lr" % mean_loss)

    trained = net.state_dict()
    update = [(name, trained[name] - t) for name, t in glob]
    st_save(a.update, update)
    print("train.py: round %d: partition %d/%d, %d examples, %d steps, mean loss %.4f, %.1f s"
          % (rnd, part, nparts, len(x), a.steps, mean_loss, time.time() - t0), file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, KeyError, TypeError) as e:
        print("train.py: %s" % e, file=sys.stderr)
        sys.exit(1)
