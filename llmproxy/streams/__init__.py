"""Incremental, bounded decoding of response bodies: SSE, streamed JSON arrays, compression."""
