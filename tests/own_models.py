"""Models that are not an ``nn.Sequential``, for the tests of ``pipedni.split`` and of the
config route (``model.factory: own_models:skip_net``): skips across several stages, integer
tensors crossing a boundary, batch norm, a ResNet with torchvision's module names."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int, batchnorm: bool = False):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.norm = nn.BatchNorm1d(width) if batchnorm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.linear(x))) + x


class SkipNet(nn.Module):
    """A stem whose output skips every block to the head (a gradient across every boundary; not
    with ``skip=False``), a bucket id computed from the input and embedded at the end (an int64
    tensor crossing without gradient), a non-persistent buffer and dropout written in forward."""

    def __init__(self, in_features: int = 8, width: int = 16, depth: int = 4, num_classes: int = 10,
                 batchnorm: bool = False, dropout: float = 0.0, skip: bool = True):
        super().__init__()
        self.skip = skip
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(Block(width, batchnorm) for _ in range(depth))
        self.buckets = nn.Embedding(4, width)
        self.head = nn.Linear(2 * width, num_classes)
        self.dropout = dropout
        self.register_buffer("scale", torch.full((in_features,), 0.5), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        bucket = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
        h = first = self.stem(x * self.scale)
        for block in self.blocks:
            h = block(h)
        h = F.dropout(h, self.dropout, self.training)
        return self.head(torch.cat([h + self.buckets(bucket), first if self.skip else h], dim=1))


def skip_net(**kwargs) -> SkipNet:
    return SkipNet(**kwargs)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, with its module names."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet-18 layout and module names (conv1, bn1, layer1..layer4, avgpool, fc),
    at a width and input size a CPU test can afford."""

    def __init__(self, width: int = 8, in_channels: int = 1, num_classes: int = 10, blocks: int = 2):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        planes = [width, 2 * width, 4 * width, 8 * width]
        inplanes = width
        for i, p in enumerate(planes):
            layer = [BasicBlock(inplanes, p, 1 if i == 0 else 2)] + [BasicBlock(p, p) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            inplanes = p
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(**kwargs) -> ResNet:
    return ResNet(**kwargs)


def gpt2(vocab_size: int, layers: int = 4, width: int = 32, heads: int = 2, context: int = 64):
    """A Hugging Face GPT-2 from a small config with random weights (no hub access), its LM
    head tied to the token embedding as in the real one; no dropout, so that runs can be
    compared exactly, and no cache (training does not use one)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=context, n_embd=width, n_layer=layers, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config)


def llama(vocab_size: int, layers: int = 4, width: int = 32, heads: int = 2, context: int = 64):
    """A Hugging Face Llama-style decoder (rotary positions, RMSNorm, grouped-query attention)
    from a small config with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=1,
                         max_position_embeddings=context, use_cache=False, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0)
    return LlamaForCausalLM(config)


def images(n_train: int = 240, n_test: int = 60, num_classes: int = 10, seed: int = 0):
    """A user's own data sets (``data.factory: own_models:images``): torch Datasets of random
    1x28x28 images whose label is the quadrant that holds the most ink."""
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n_train + n_test, 1, 28, 28, generator=g)
    quadrants = x.unfold(2, 14, 14).unfold(3, 14, 14).sum(dim=(-1, -2)).flatten(1)  # [N, 4]
    y = quadrants.argmax(dim=1) % num_classes
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def not_data():
    return torch.zeros(3)


class Ragged(nn.Module):
    """A boundary tensor whose width follows the batch size (so it changes between the probe's
    batch and the training microbatches): what the receiving stage must refuse by name."""

    def __init__(self):
        super().__init__()
        self.a, self.narrow, self.b = nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        ragged = self.narrow(h[:, : x.shape[0] % 4 + 1])  # crosses a cut before b: used after it
        return self.b(h) + ragged.sum(dim=1, keepdim=True)


def ragged() -> Ragged:
    return Ragged()


class Bucketed(nn.Module):
    """Its first part computes integer ids alone: a cut before the embedding carries nothing
    that needs a gradient."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.embed, self.head = nn.Embedding(2, 4), nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x[:, :4] > 0).long()
        return self.head(self.embed(ids).flatten(1))


def bucketed() -> Bucketed:
    return Bucketed()



class NamedInputs(torch.utils.data.Dataset):
    """A user's data set whose items are ({name: tensor}, label): a tokenizer's output."""

    def __init__(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor):
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return {name: t[i] for name, t in self.inputs.items()}, self.labels[i]


def padded_tokens(vocab_size: int = 24, n_train: int = 96, n_test: int = 32, seq: int = 16, seed: int = 0):
    """Left-padded token sequences of random lengths with their attention masks (so that the
    mask changes every real token's attention), named as a tokenizer names them but with the
    mask first (not forward's order); each sequence counts up from a random token, and the label
    of each position is the next token (0, the pad, before the start)."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    start = torch.randint(1, vocab_size, (n, 1), generator=g)
    ids = (start + torch.arange(seq + 1)) % (vocab_size - 1) + 1
    lengths = torch.randint(seq // 2, seq + 1, (n, 1), generator=g)
    mask = (torch.arange(seq + 1) >= seq + 1 - lengths).long()
    ids = ids * mask
    labels, ids, mask = ids[:, 1:], ids[:, :-1], mask[:, :-1]
    sets = [NamedInputs({"attention_mask": mask[s], "input_ids": ids[s]}, labels[s])
            for s in (slice(0, n_train), slice(n_train, n))]
    return sets[0], sets[1]


class Tagged(nn.Module):
    """Two positional inputs: features, and a categorical tag per sample embedded beside them."""

    def __init__(self, in_features: int = 8, tags: int = 5, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.tag = nn.Embedding(tags, width)
        self.body = nn.Sequential(nn.Linear(in_features, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor, tag: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x) + self.tag(tag))


def tagged() -> Tagged:
    return Tagged()


class Pairs(torch.utils.data.Dataset):
    """Items ((x, tag), label): a model's two positional inputs and the label."""

    def __init__(self, x: torch.Tensor, tag: torch.Tensor, labels: torch.Tensor):
        self.x, self.tag, self.labels = x, tag, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return (self.x[i], self.tag[i]), self.labels[i]


def tagged_data(n_train: int = 240, n_test: int = 60, seed: int = 0):
    """(features, tag) inputs with labels that need both: the sign of the first feature and the tag."""
    g = torch.Generator().manual_seed(seed)
    x, tag = torch.randn(n_train + n_test, 8, generator=g), torch.randint(0, 5, (n_train + n_test,), generator=g)
    y = (x[:, 0] > 0).long() * 5 + tag
    return Pairs(x[:n_train], tag[:n_train], y[:n_train]), Pairs(x[n_train:], tag[n_train:], y[n_train:])


class Lopsided(nn.Module):
    """Parameters mislead about time: its first block repeats a small layer many times (few
    parameters, most of the compute); the others each hold a large embedding table they barely
    touch (most of the parameters, little compute)."""

    class Heavy(nn.Module):
        def __init__(self, width: int, repeats: int):
            super().__init__()
            self.layer, self.repeats = nn.Linear(width, width), repeats

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(self.repeats):
                x = torch.tanh(self.layer(x))
            return x

    class Light(nn.Module):
        def __init__(self, width: int, table: int):
            super().__init__()
            self.table, self.layer = nn.Embedding(table, width), nn.Linear(width, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x) + self.table.weight[:1]

    def __init__(self, width: int = 64, repeats: int = 60, table: int = 4000, num_classes: int = 10):
        super().__init__()
        self.blocks = nn.ModuleList([Lopsided.Heavy(width, repeats), *(Lopsided.Light(width, table) for _ in range(3))])
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def lopsided(**kwargs) -> Lopsided:
    return Lopsided(**kwargs)
