"""Archive storage: message bytes in a content-addressed blob store, plus the
metadata read from each message's headers.

`blobstore.BlobStore` is the small interface (`LocalBlobStore` is its disk
backend); `metadata.parse_metadata` turns raw RFC 5322 bytes into the fields
the database keeps, and never refuses a message because it is messy.
"""
