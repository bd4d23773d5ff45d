DefinitionBlock ("", "SSDT", 2, "EMBER ", "KITCHEN ", 1)
{
    Name (_S5, Package (0x04) { 0x05, 0x05, Zero, Zero })
    Scope (\_SB)
    {
        Mutex (MTX0, 0)
        Device (DEV0)
        {
            Name (_HID, EisaId ("PNP0A03"))
            Name (_CRS, ResourceTemplate ()
            {
                IO (Decode16, 0x0060, 0x0060, 0x01, 0x01, )
                IRQNoFlags () {1}
                Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive, ,, ) {9}
                Memory32Fixed (ReadWrite, 0xFEC00000, 0x00001000, )
                WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0x0000, 0x0000, 0x00FF, 0x0000, 0x0100,,, )
                WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0x0000, 0x0000, 0x0CF7, 0x0000, 0x0CF8,,, , TypeStatic, DenseTranslation)
                DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, 0x00000000, 0xE0000000, 0xFEBFFFFF, 0x00000000, 0x1EC00000,,, , AddressRangeMemory, TypeStatic)
                QWordMemory (ResourceConsumer, PosDecode, MinFixed, MaxFixed, Prefetchable, ReadOnly, 0x0000000000000000, 0x0000008000000000, 0x000000FFFFFFFFFF, 0x0000000000000000, 0x0000008000000000,,, , AddressRangeMemory, TypeStatic)
            })
            OperationRegion (REG0, PCI_Config, Zero, 0x0100)
            Field (REG0, DWordAcc, Lock, Preserve)
            {
                VID,   16,
                Offset (0x40),
                CTRL,  32
            }
            OperationRegion (PEOR, SystemIO, 0x0505, One)
            Field (PEOR, ByteAcc, NoLock, WriteAsZeros)
            {
                PEPT,   8
            }
            OperationRegion (MEM0, SystemMemory, 0xFED00000, 0x0400)
            Name (BIG0, 0x0000000100000000)
            Name (ALL1, Ones)
            Name (BUF0, Buffer (0x03) { 0x01, 0x02, 0x03 })
            Name (PKG0, Package (0x02) { "QEMU0001", \_SB.DEV0 })
            Method (ADD2, 2, Serialized)
            {
                Return (Add (Arg0, Arg1))
            }
            Method (_STA, 0, NotSerialized)
            {
                Acquire (^^MTX0, 0xFFFF)
                Store (ADD2 (One, 0x02), Local0)
                Release (^^MTX0)
                If (LEqual (Local0, 0x03))
                {
                    Return (0x0F)
                }
                Else
                {
                    Return (Zero)
                }
            }
            Method (LOOP, 1, NotSerialized)
            {
                Store (Zero, Local0)
                While (LLess (Local0, Arg0))
                {
                    Increment (Local0)
                    Store (ShiftLeft (Local0, 0x04), Local1)
                    Store (ShiftRight (Local1, One), Local2)
                    Store (And (Local2, 0xFF), Local3)
                    Store (Or (Local3, 0x0100), Local4)
                    Store (Subtract (Local4, One), Local5)
                }
                If (LAnd (LNot (Arg0), LLess (Local0, 0x10)))
                {
                    Notify (\_SB.DEV0, One)
                }
                Return (Local5)
            }
            Method (BUFS, 1, NotSerialized)
            {
                CreateDWordField (Arg0, 0x04, CDW2)
                Store (ToBuffer (Arg0), Local0)
                Store (SizeOf (Local0), Local1)
                Store (DerefOf (Index (PKG0, One)), Local2)
                Store (0x12345678, CDW2)
                Return (Add (Local1, Local2))
            }
        }
    }
}
