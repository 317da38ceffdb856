"""Teacher-feature cache (SPEC section 4): each sample's teacher tokens computed once, keyed by its
stable id, stored in half precision, read back in later epochs and runs. `keys` (ids, views and
fingerprints), `stores` (a dict in RAM, safetensors shards on disk), `cached` (the caching teacher,
same call as the teacher it wraps) and `metadata` (what a disk cache records and checks)."""

from lightning_repa.teachers.cache.cached import CachedTeacher
from lightning_repa.teachers.cache.keys import cache_keys, fingerprint, same_sample, sample_ids
from lightning_repa.teachers.cache.metadata import FORMAT_VERSION, cache_metadata, describe_weights, file_sha256
from lightning_repa.teachers.cache.stores import DiskStore, Entry, FeatureStore, MemoryStore, StaleCacheError

__all__ = ["FORMAT_VERSION", "CachedTeacher", "DiskStore", "Entry", "FeatureStore", "MemoryStore", "StaleCacheError",
           "cache_keys", "cache_metadata", "describe_weights", "file_sha256", "fingerprint", "same_sample",
           "sample_ids"]
