-- The original Flask service's table, exactly as it created it. On a fresh
-- database this creates it; on a seed-era database it does nothing. Either
-- way, 0002 then brings it to the current format: one upgrade path for both.
CREATE TABLE IF NOT EXISTS patient_records (
    id SERIAL PRIMARY KEY,
    username VARCHAR(80) NOT NULL,
    record_name VARCHAR(255) NOT NULL,
    record_data TEXT,
    file_data BYTEA,
    file_type VARCHAR(50),
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);
