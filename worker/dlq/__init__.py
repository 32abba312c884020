"""`waddle-ai dlq`: dead letters listed, shown, replayed and purged, safely.

One job a module: `letters` (what a dead letter is, read from its headers,
and which ones a replay selects), `box` (the broker access: taking letters
without losing one, republishing with confirms), `render` (tables, one
letter, the progress bar) and `cli` (the argparse command wiring them).
"""
