"""Limits of AWS and Airflow that vod-sr must respect (see AWS_NOTES in the design docs)."""

from __future__ import annotations

# AWS-RunShellScript's executionTimeout ceiling: 48 h.
MAX_EXECUTION_TIMEOUT = 172_800
# Chunks of one run. Chunks are not mapped tasks (lanes are), so Airflow's max_map_length does not bound them; a
# chunk's index must stay below the numbers of chunks sent again (operators.RESEND_INDEX_BASE, 100,000) and its
# keys have five digits (script.chunk_keys).
MAX_CHUNKS = 99_999
# SendCommand's Comment limit.
MAX_COMMENT_LENGTH = 100
# SendCommand's InstanceIds limit; vod-sr also caps the instances of one run at it.
MAX_SSM_TARGETS = 50
# Files per SSM command: each prints a result line, and GetCommandInvocation shows only 24,000 characters.
MAX_CHUNK_SIZE = 200
