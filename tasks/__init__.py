"""Pipeline stages: plain, typed functions (tested directly) plus thin Prefect task wrappers."""
