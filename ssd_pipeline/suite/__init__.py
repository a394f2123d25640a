"""The orchestration layer: which models exist and how one is resolved, the accuracy loop,
the speed records, the report and the main job. The CLI and the conftest both go through it."""
