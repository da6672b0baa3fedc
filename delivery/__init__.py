"""Live delivery: pushes each stored change (post, edit, deletion) of a chat to its subscribed
participants over WebSocket or Server-Sent Events, with resume from a cursor (docs/operations.md,
"Live delivery")."""
