"""``accelerate launch tests/slow_encode.py --config ...``: ``training.train_ldm`` with every
latent-cache shard taking a second longer to encode, so that a test can kill a real multi-process
run in the middle of its encode (tests/test_train_ldm.py)."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import training.data.cache.write as latent_cache  # noqa: E402
from training.train_ldm import main  # noqa: E402

_encode_shard = latent_cache._encode_shard


def _slow_encode_shard(*args, **kwargs):
    time.sleep(1.0)
    return _encode_shard(*args, **kwargs)


latent_cache._encode_shard = _slow_encode_shard
main()
