"""Reading and writing the Parquet files that are the only interface between stages, and their schemas."""
