# frozen_string_literal: true

require "digest"
require "zlib"

module MicrosandboxSpec
  # Writes small tar layers entry by entry, including PAX extended headers (for
  # `SCHILY.xattr.*` records), which neither GNU tar from a plain directory nor Ruby's
  # standard library can produce without root-only xattrs on the host.
  class TarWriter
    Entry = Struct.new(:name, :type, :mode, :data, :pax, keyword_init: true)

    def initialize
      @out = +"".b
    end

    def dir(name, mode: 0o755, pax: {})
      add(Entry.new(name: name, type: "5", mode: mode, data: "", pax: pax))
    end

    def file(name, data, mode: 0o644, pax: {})
      add(Entry.new(name: name, type: "0", mode: mode, data: data.b, pax: pax))
    end

    # The tar bytes (with the end-of-archive marker).
    def tar = @out + ("\0" * 1024)

    # Writes the tar gzipped to `path`; returns a layer (path, digest, size, diff_id).
    def write_layer(path)
      raw = tar
      File.binwrite(path, Zlib.gzip(raw))
      DebianImage::Layer.new(path: path, digest: "sha256:#{Digest::SHA256.file(path).hexdigest}",
                             size: File.size(path), diff_id: "sha256:#{Digest::SHA256.hexdigest(raw)}")
    end

    private

    def add(entry)
      unless entry.pax.empty?
        records = entry.pax.map { |k, v| pax_record(k, v.b) }.join
        write_entry("PaxHeaders/#{File.basename(entry.name)}", "x", 0o644, records)
      end
      write_entry(entry.name, entry.type, entry.mode, entry.data)
      self
    end

    # "<len> <key>=<value>\n", where <len> counts itself.
    def pax_record(key, value)
      body = " #{key}=".b + value + "\n"
      len = body.bytesize + 1
      len += 1 until len.to_s.bytesize + body.bytesize == len
      len.to_s.b + body
    end

    def write_entry(name, type, mode, data)
      raise ArgumentError, "name too long for ustar: #{name}" if name.bytesize > 99

      fields = [
        name.b.ljust(100, "\0"), format("%07o\0", mode), format("%07o\0", 0), format("%07o\0", 0),
        format("%011o\0", data.bytesize), format("%011o\0", 1_700_000_000), " " * 8, type,
        "\0" * 100, "ustar\0", "00", "root".ljust(32, "\0"), "root".ljust(32, "\0"),
        format("%07o\0", 0), format("%07o\0", 0), "\0" * 155, "\0" * 12
      ]
      header = fields.join.b
      checksum = header.bytes.sum
      header[148, 8] = format("%06o\0 ", checksum)
      @out << header << data << ("\0" * (-data.bytesize % 512))
    end
  end
end
