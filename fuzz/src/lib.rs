//! Shared pieces of the fuzz targets (see README.md): the model driver in `harness` and the
//! input layout every target uses.

pub mod harness;

#[global_allocator]
static METER: harness::Meter = harness::Meter;

/// A fuzz input is three steering bytes, then the byte stream: the first picks how the stream
/// is cut into reads, the second which way the driver's decisions go (accept or refuse a
/// login, retry), the third the machine's options.
pub fn steer(data: &[u8]) -> Option<([u8; 3], &[u8])> {
    let (head, stream) = data.split_first_chunk::<3>()?;
    Some((*head, stream))
}
