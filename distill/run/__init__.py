"""The run dir's machinery: which stages run (pipeline), what each may read of the config, the
fingerprints of their input files, the lock, checksums, the typed readers and writers of the stage
outputs (artifacts), the Accelerator and the trackers."""
