"""Reading Cdiscount BSON files, decoding pictures, the category table, datasets and generated data."""
