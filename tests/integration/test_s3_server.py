"""The loopback S3 server the storage tests stand on answers boto3 and pyarrow alike."""

from pydantic import SecretStr

from relay_train.data.store import s3_filesystem


def test_boto3_and_pyarrow_see_the_same_bucket(s3_endpoint, s3_bucket):
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="a/b.txt", Body=b"hello")
    s3 = s3_filesystem(s3_endpoint, SecretStr("testing"), SecretStr("testing"), "us-east-1")
    with s3.open_input_stream(f"{bucket}/a/b.txt") as fh:
        assert fh.read() == b"hello"
