"""Readers for webdataset shards and caption tables."""
