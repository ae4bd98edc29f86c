"""The domain, by what its modules know (docs/design.md has the rules):

- ``pipeline.dicom``: series as data (headers, contrast, volumes, the derived series);
- ``pipeline.model``: the U-Net, its pre- and post-processing, model files, inference;
- ``pipeline.state``: the database, leases, the job queue and deliveries;
- the stages at this level: intake, completion, routing, synthesis, worker, retention,
  and the spool they keep files in; beside them files (durable writes), redact (log
  lines), choices (StrEnums) and settings (of the parts that run models).
"""
