-- A database as dicomnode 0.1.0 (main at 7f95830, before schema migrations) wrote it:
-- its tables and one series, instance, done job and sent delivery (sqlite3 .dump).
BEGIN TRANSACTION;
CREATE TABLE delivery (
	id INTEGER NOT NULL,
	job_id INTEGER NOT NULL,
	destination VARCHAR NOT NULL,
	state VARCHAR(16) NOT NULL,
	reason VARCHAR,
	attempts INTEGER NOT NULL,
	next_attempt_at DATETIME,
	instances_total INTEGER,
	instances_sent INTEGER NOT NULL,
	instance_results JSON,
	created_at DATETIME NOT NULL,
	updated_at DATETIME NOT NULL,
	lease_owner VARCHAR,
	lease_expires_at DATETIME,
	lease_host VARCHAR,
	lease_pid INTEGER,
	lease_process_start VARCHAR,
	PRIMARY KEY (id),
	FOREIGN KEY(job_id) REFERENCES job (id)
);
INSERT INTO "delivery" VALUES(1,1,'pacs','sent',NULL,1,NULL,1,1,'{"1.2.826.0.1.3680043.8.498.6": {"stored": true, "detail": null}}','2026-11-30 12:00:00.000000','2026-11-30 12:00:00.000000',NULL,NULL,NULL,NULL,NULL);
CREATE TABLE instance (
	id INTEGER NOT NULL,
	series_id INTEGER NOT NULL,
	sop_instance_uid VARCHAR(64) NOT NULL,
	sop_class_uid VARCHAR(64) NOT NULL,
	transfer_syntax_uid VARCHAR(64) NOT NULL,
	path VARCHAR NOT NULL,
	size INTEGER NOT NULL,
	instance_number INTEGER,
	calling_ae VARCHAR(16) NOT NULL,
	received_at DATETIME NOT NULL,
	PRIMARY KEY (id),
	FOREIGN KEY(series_id) REFERENCES series (id),
	UNIQUE (sop_instance_uid)
);
INSERT INTO "instance" VALUES(1,1,'1.2.826.0.1.3680043.8.498.4','1.2.840.10008.5.1.4.1.1.4','1.2.840.10008.1.2.1','incoming/a/b/c.dcm',4000,1,'MRI1','2026-11-30 12:00:00.000000');
CREATE TABLE job (
	id INTEGER NOT NULL,
	series_id INTEGER NOT NULL,
	generation INTEGER NOT NULL,
	route VARCHAR NOT NULL,
	direction VARCHAR(16) NOT NULL,
	model VARCHAR NOT NULL,
	destinations JSON NOT NULL,
	state VARCHAR(16) NOT NULL,
	reason VARCHAR,
	attempts INTEGER NOT NULL,
	not_before DATETIME,
	started_at DATETIME,
	model_version VARCHAR,
	model_checksum VARCHAR,
	device VARCHAR,
	timings JSON,
	output_series_uid VARCHAR(64),
	output_path VARCHAR,
	output_count INTEGER,
	created_at DATETIME NOT NULL,
	updated_at DATETIME NOT NULL,
	lease_owner VARCHAR,
	lease_expires_at DATETIME,
	lease_host VARCHAR,
	lease_pid INTEGER,
	lease_process_start VARCHAR,
	PRIMARY KEY (id),
	FOREIGN KEY(series_id) REFERENCES series (id)
);
INSERT INTO "job" VALUES(1,1,1,'t1-to-t2','t1-to-t2','t1-to-t2','["pacs"]','done',NULL,1,NULL,'2026-11-30 12:00:00.000000','v5','sha256:00','cpu','{"load_s": 0.1}','1.2.826.0.1.3680043.8.498.5','out/job-1',1,'2026-11-30 12:00:00.000000','2026-11-30 12:00:00.000000',NULL,NULL,NULL,NULL,NULL);
CREATE TABLE series (
	id INTEGER NOT NULL,
	series_uid VARCHAR(64) NOT NULL,
	study_uid VARCHAR(64) NOT NULL,
	sop_class_uid VARCHAR(64) NOT NULL,
	calling_ae VARCHAR(16) NOT NULL,
	description VARCHAR(64),
	series_number INTEGER,
	rows INTEGER NOT NULL,
	columns INTEGER NOT NULL,
	orientation VARCHAR(128),
	pixel_spacing VARCHAR(64),
	frame_of_reference_uid VARCHAR(64),
	expected_count INTEGER,
	count_consistent BOOLEAN NOT NULL,
	acquisition_number INTEGER,
	instance_count INTEGER NOT NULL,
	first_arrival DATETIME NOT NULL,
	last_arrival DATETIME NOT NULL,
	header JSON NOT NULL,
	contrast VARCHAR(16) NOT NULL,
	contrast_reason VARCHAR NOT NULL,
	state VARCHAR(16) NOT NULL,
	state_reason VARCHAR,
	generation INTEGER NOT NULL,
	completed_at DATETIME,
	purged_at DATETIME,
	PRIMARY KEY (id),
	UNIQUE (series_uid)
);
INSERT INTO "series" VALUES(1,'1.2.826.0.1.3680043.8.498.1','1.2.826.0.1.3680043.8.498.2','1.2.840.10008.5.1.4.1.1.4','MRI1','AX T1 SE',3,32,32,'1\0\0\0\1\0','1\1','1.2.826.0.1.3680043.8.498.3',1,1,NULL,1,'2026-11-30 12:00:00.000000','2026-11-30 12:00:00.000000','{"SeriesDescription": "AX T1 SE"}','T1','TR 500 ms, TE 12 ms','routed',NULL,1,'2026-11-30 12:00:00.000000',NULL);
CREATE INDEX ix_series_state ON series (state);
CREATE INDEX ix_instance_series_id ON instance (series_id);
CREATE INDEX ix_job_series_id ON job (series_id);
CREATE INDEX ix_job_state ON job (state);
CREATE INDEX ix_delivery_job_id ON delivery (job_id);
CREATE INDEX ix_delivery_state ON delivery (state);
COMMIT;
