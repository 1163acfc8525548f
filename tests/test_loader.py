"""common/runtime/loader.py: a worker's batch reaches the step unchanged, its small tensors by value."""

import numpy as np
import torch

from common.runtime import loader


class _Items(torch.utils.data.Dataset):
    """What the trainers' datasets return: fp16 embeddings, uint8 pictures, bool masks, ints; one bf16 tensor."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"index": i, "embeds": torch.randn(77, 16, generator=g).half(), "valid": torch.rand(32, 32, generator=g) > 0.5,
                "picture": torch.randint(0, 256, (3, 300, 300), generator=g, dtype=torch.uint8),  # 270 KB: two exceed BY_VALUE
                "bf16": torch.randn(8, generator=g).bfloat16()}


def test_a_workers_batch_comes_back_equal_with_only_the_large_tensors_in_shared_memory():
    data = _Items()
    batches = torch.utils.data.DataLoader(data, batch_size=2, num_workers=1, collate_fn=loader.collate)
    for k, sent in enumerate(batches):
        assert isinstance(sent["embeds"], np.ndarray) and isinstance(sent["valid"], np.ndarray) and isinstance(sent["index"], np.ndarray)
        assert torch.is_tensor(sent["picture"]) and torch.is_tensor(sent["bf16"])  # over 256 KiB; a dtype NumPy lacks
        got = loader.as_tensors(sent)
        expect = torch.utils.data.default_collate([data[2 * k], data[2 * k + 1]])
        assert got.keys() == expect.keys()
        for key in expect:
            assert got[key].dtype == expect[key].dtype and torch.equal(got[key], expect[key]), key
