"""Prometheus metrics shared by the API and the engine (torch-free)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("service_requests_total", "HTTP requests", ["route", "status"])
LATENCY = Histogram(
    "service_request_latency_seconds", "HTTP request latency", ["route"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
BATCH_SIZE = Histogram("service_batch_size", "rows per decode step", buckets=(1, 2, 4, 8, 12, 16, 24, 32, 64))
QUEUE_DEPTH = Gauge("service_queue_depth", "requests waiting for a batch")
ADAPTERS_LOADED = Gauge("service_adapters_loaded", "adapters resident in slots")
ADAPTER_REQUESTS = Counter("service_adapter_requests_total", "answered rows per adapter", ["adapter"])
GENERATED_TOKENS = Counter("service_generated_tokens_total", "completion tokens generated")
PREFIX_CACHE_LOOKUPS = Counter(
    "service_prefix_cache_lookups_total", "image-prefix KV cache lookups by prompts with images", ["result"]
)
DECODED_IMAGE_LOOKUPS = Counter(
    "service_decoded_image_lookups_total", "uploaded images looked up among those decoded recently", ["result"]
)
PREFIX_CACHE_BYTES = Gauge("service_prefix_cache_bytes", "bytes of image-prefix keys and values cached")
