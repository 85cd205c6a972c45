// ZipRead: read a ZIP archive with java.util.zip and print one line per entry:
// "<sha256 hex> <size> <UTF-8 name as hex>".
//
// Usage: java ZipRead file ARCHIVE   (java.util.zip.ZipFile: the central directory, random access)
//        java ZipRead stream < ARCHIVE   (java.util.zip.ZipInputStream: local headers, from a pipe)
//
// ZipInputStream checks each entry's CRC-32 and sizes itself (against the local header or the
// data descriptor). ZipFile does not check CRC-32s, so this program computes each one and
// compares it with the central directory's. Any problem ends the program with status 1.

import java.io.BufferedInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.Enumeration;
import java.util.HexFormat;
import java.util.zip.CRC32;
import java.util.zip.ZipEntry;
import java.util.zip.ZipFile;
import java.util.zip.ZipInputStream;

public final class ZipRead {
    private static final HexFormat HEX = HexFormat.of();
    private final byte[] buffer = new byte[1 << 20];
    private final PrintStream out;

    private ZipRead(PrintStream out) {
        this.out = out;
    }

    /** Read {@code in} to its end; print the entry's line; return its CRC-32. */
    private long consume(String name, InputStream in) throws IOException, NoSuchAlgorithmException {
        MessageDigest digest = MessageDigest.getInstance("SHA-256");
        CRC32 crc = new CRC32();
        long size = 0;
        int read;
        while ((read = in.read(buffer)) != -1) {
            digest.update(buffer, 0, read);
            crc.update(buffer, 0, read);
            size += read;
        }
        out.println(HEX.formatHex(digest.digest()) + " " + size + " "
                + HEX.formatHex(name.getBytes(StandardCharsets.UTF_8)));
        return crc.getValue();
    }

    private void readFile(String path) throws IOException, NoSuchAlgorithmException {
        try (ZipFile archive = new ZipFile(path, StandardCharsets.UTF_8)) {
            Enumeration<? extends ZipEntry> entries = archive.entries();
            while (entries.hasMoreElements()) {
                ZipEntry entry = entries.nextElement();
                long crc;
                try (InputStream in = archive.getInputStream(entry)) {
                    crc = consume(entry.getName(), in);
                }
                if (crc != entry.getCrc()) {
                    throw new IOException(String.format("%s: CRC-32 of the data %08x, the directory says %08x",
                            entry.getName(), crc, entry.getCrc()));
                }
            }
        }
    }

    private void readStream(InputStream stdin) throws IOException, NoSuchAlgorithmException {
        try (ZipInputStream archive = new ZipInputStream(new BufferedInputStream(stdin, 1 << 16),
                StandardCharsets.UTF_8)) {
            ZipEntry entry;
            while ((entry = archive.getNextEntry()) != null) {
                consume(entry.getName(), archive);
                archive.closeEntry();
            }
        }
    }

    public static void main(String[] args) throws Exception {
        PrintStream out = new PrintStream(System.out, false, StandardCharsets.US_ASCII);
        ZipRead reader = new ZipRead(out);
        try {
            if (args.length == 2 && args[0].equals("file")) {
                reader.readFile(args[1]);
            } else if (args.length == 1 && args[0].equals("stream")) {
                reader.readStream(System.in);
            } else {
                System.err.println("usage: ZipRead file ARCHIVE | ZipRead stream < ARCHIVE");
                System.exit(2);
            }
        } catch (IOException exc) {
            out.flush();
            System.err.println("ZipRead: " + exc);
            System.exit(1);
        }
        out.flush();
        if (out.checkError()) {
            System.err.println("ZipRead: error writing the output");
            System.exit(1);
        }
    }
}
