"""Models, tasks (loss and metric), the flat-parameter client trainer and devices (imports core, data)."""
