"""The flywheel: generate, score, select and train in rounds, each round's model feeding the next
(docs/flywheel.md). ``tasks/`` holds small verifiable tasks that configs and tests run end to end."""
