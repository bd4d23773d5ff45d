//! The 16550A UART on COM1, from vm-superio, with its interrupt line and output sink injected.
//!
//! Input is pushed by the VMM's event loop, never more than the UART's FIFO has room for;
//! when the guest drains the FIFO the device signals `rx_space`, and the event loop reads
//! more. So a host flooding the console never makes the VMM buffer without bound or spin.

use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};

use crate::bus::BusDevice;
use crate::Interrupt;

/// COM1's base port.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's IRQ.
pub const COM1_IRQ: u32 = 4;
/// Registers of a UART.
pub const UART_LEN: u16 = 8;

/// Adapts an [`Interrupt`] to vm-superio's trigger.
pub struct IrqTrigger(Arc<dyn Interrupt>);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// Signals the event loop when the guest has emptied the receive FIFO.
pub struct RxSpace(Arc<dyn Interrupt>);

impl SerialEvents for RxSpace {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.trigger() {
            log::warn!("serial: cannot signal input space: {e}");
        }
    }
}

/// The UART on the PIO bus.
pub struct SerialDevice {
    serial: Serial<IrqTrigger, RxSpace, Box<dyn Write + Send>>,
}

impl SerialDevice {
    /// A UART raising `irq`, writing guest output to `out`, signalling `rx_space` when the
    /// guest has read all queued input.
    pub fn new(
        irq: Arc<dyn Interrupt>,
        rx_space: Arc<dyn Interrupt>,
        out: Box<dyn Write + Send>,
    ) -> Self {
        SerialDevice {
            serial: Serial::with_events(IrqTrigger(irq), RxSpace(rx_space), out),
        }
    }

    /// Bytes of input the FIFO can take now.
    pub fn input_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// Queues host input for the guest; returns how many bytes were taken (at most
    /// [`Self::input_capacity`]).
    pub fn queue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.serial.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        match self.serial.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial: cannot queue input: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.serial.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        // Output errors (a full pty, a closed pipe) lose the byte, as on a real line.
        if let Err(e) = self.serial.write(off, value) {
            log::debug!("serial: output byte lost: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::test_utils::CountingInterrupt;

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 1;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn uart() -> (
        SerialDevice,
        Arc<CountingInterrupt>,
        Arc<CountingInterrupt>,
        SharedBuf,
    ) {
        let irq = Arc::new(CountingInterrupt::default());
        let space = Arc::new(CountingInterrupt::default());
        let out = SharedBuf::default();
        let dev = SerialDevice::new(irq.clone(), space.clone(), Box::new(out.clone()));
        (dev, irq, space, out)
    }

    fn read(d: &mut SerialDevice, off: u64) -> u8 {
        let mut b = [0u8];
        d.read(off, &mut b);
        b[0]
    }

    #[test]
    fn guest_output_reaches_the_sink() {
        let (mut d, _, _, out) = uart();
        for b in b"hi\n" {
            d.write(DATA, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
    }

    #[test]
    fn input_raises_irq_and_is_read_in_order() {
        let (mut d, irq, space, _) = uart();
        d.write(IER, &[1]); // received-data interrupt on
        let before = irq.count();
        assert_eq!(d.queue_input(b"ab"), 2);
        assert!(irq.count() > before);
        assert_ne!(read(&mut d, LSR) & LSR_DATA_READY, 0);
        assert_eq!(read(&mut d, DATA), b'a');
        assert_eq!(space.count(), 0);
        assert_eq!(read(&mut d, DATA), b'b');
        assert_eq!(space.count(), 1, "drained FIFO is signalled");
        assert_eq!(read(&mut d, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn input_flood_is_bounded_by_the_fifo() {
        let (mut d, _, _, _) = uart();
        let cap = d.input_capacity();
        assert!(cap > 0);
        assert_eq!(d.queue_input(&vec![b'x'; 100_000]), cap);
        assert_eq!(d.input_capacity(), 0);
        assert_eq!(d.queue_input(b"more"), 0);
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let (mut d, _, _, _) = uart();
        let mut wide = [0u8; 4];
        d.read(u64::MAX, &mut wide);
        d.read(3, &mut []);
        d.write(7, &[]);
        d.write(1000, &[1, 2, 3, 4]);
    }
}
