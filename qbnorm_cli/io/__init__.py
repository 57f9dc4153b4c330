"""Files: input specs and readers, foreign formats, validation, the probe schema, atomic writers."""
