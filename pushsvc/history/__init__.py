"""Message history: pushes with a ``ttl`` are kept so a client that reconnects can catch up.

Each uid and each group is a *channel* (``u:<uid>``, ``g:<group>``) with a
stream: a random *epoch*, an integer *offset* that grows by one per stored
message, and the last ``--history-size`` messages, each until its ttl.  A
client tells us the last (offset, epoch) it saw; we replay what it missed, or
tell it that we cannot (trimmed, expired, epoch changed), never a partial
replay.  ``store`` keeps streams (in memory on one node, in Redis for a
cluster); ``replay`` holds a recovering connection's live frames and
releases them around the replay (docs/history.md).
"""
