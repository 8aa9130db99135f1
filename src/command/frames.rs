//! The frames the proxy itself sends to Redis to set up a connection's state (`SELECT`,
//! `HELLO`): one home for each, used by the lanes, dedicated connections, the sequencer's
//! streams and the pair shells. `*_args` give the same command as arguments, for the
//! round-trip helpers that take argument lists.

use bytes::Bytes;

use crate::resp::Request;

/// `SELECT <db>` as arguments.
pub fn select_args(db: u32) -> Vec<Vec<u8>> {
    vec![b"SELECT".to_vec(), db.to_string().into_bytes()]
}

/// `SELECT <db>` as a RESP frame.
pub fn select(db: u32) -> Bytes {
    Request::from_args(&select_args(db)).frame
}

/// `HELLO <proto>` as arguments (switches the connection's protocol).
pub fn hello_args(proto: u8) -> Vec<Vec<u8>> {
    vec![b"HELLO".to_vec(), proto.to_string().into_bytes()]
}

/// `HELLO <proto>` as a RESP frame.
pub fn hello(proto: u8) -> Bytes {
    Request::from_args(&hello_args(proto)).frame
}

#[cfg(test)]
mod tests {
    #[test]
    fn frames_are_the_commands() {
        assert_eq!(&super::select(3)[..], b"*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n");
        assert_eq!(&super::hello(3)[..], b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n");
    }
}
