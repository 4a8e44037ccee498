"""The traced step the replay allocator records and the planner lays out: one row per event, in host order.

Why a contract of its own: the runtime (`orchestrator.memory.replay_allocator`) records it and the planner
(`planner.traced_layout`) places it, and neither imports the other. A row is (kind, request, size, stream): kind
`MALLOC` or `FREE`; request, the allocation's number in the step window (from 0; -1 for a free of a block allocated
before the window); size in bytes; the stream handle it was allocated on. The row's index is its time.
"""

MALLOC, FREE = 1, 2
COLUMNS = ("kind", "request", "size", "stream")
