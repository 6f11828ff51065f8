"""Private interaction data: synthetic personas, JSONL files, chat encoding and batching."""

from fedmilm.data.chat import IGNORE, Batch, Example, batches, encode, encode_all
from fedmilm.data.jsonl import DataFormatError
from fedmilm.data.users import UserData, count_users, load_user

__all__ = ["IGNORE", "Batch", "DataFormatError", "Example", "UserData", "batches", "count_users",
           "encode", "encode_all", "load_user"]
