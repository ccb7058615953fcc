# frozen_string_literal: true

require "openssl"

module MicrosandboxSpec
  # Test certificates made on the spot (Ruby's openssl): a CA and a server certificate it
  # signed, for the TLS servers of the secrets specs and bench/secrets_tls.rb.
  module TestPki
    module_function

    def cert(subject, key, issuer: nil, issuer_key: nil, ca: false, names: [])
      c = OpenSSL::X509::Certificate.new
      c.version = 2
      c.serial = OpenSSL::BN.rand(64)
      c.subject = OpenSSL::X509::Name.parse(subject)
      c.issuer = issuer ? issuer.subject : c.subject
      c.public_key = key
      c.not_before = Time.now - 3600
      c.not_after = Time.now + (2 * 86_400)
      ef = OpenSSL::X509::ExtensionFactory.new
      ef.subject_certificate = c
      ef.issuer_certificate = issuer || c
      if ca
        c.add_extension(ef.create_extension("basicConstraints", "CA:TRUE", true))
        c.add_extension(ef.create_extension("keyUsage", "keyCertSign,cRLSign", true))
      else
        c.add_extension(ef.create_extension("basicConstraints", "CA:FALSE", true))
        c.add_extension(ef.create_extension("extendedKeyUsage", "serverAuth"))
        c.add_extension(ef.create_extension("subjectAltName", names.map { |n| "DNS:#{n}" }.join(",")))
      end
      c.sign(issuer_key || key, OpenSSL::Digest.new("SHA256"))
      c
    end

    # A CA and a server certificate for `names` it signed, written to `dir` as
    # `<tag>-ca.pem`, `<tag>-cert.pem`, `<tag>-key.pem`; returns those three paths.
    def write(dir, tag, names)
      ca_key = OpenSSL::PKey::EC.generate("prime256v1")
      ca = cert("/CN=msb spec #{tag} CA", ca_key, ca: true)
      key = OpenSSL::PKey::EC.generate("prime256v1")
      leaf = cert("/CN=#{names.first}", key, issuer: ca, issuer_key: ca_key, names: names)
      paths = %w[ca.pem cert.pem key.pem].map { |f| File.join(dir, "#{tag}-#{f}") }
      File.write(paths[0], ca.to_pem)
      File.write(paths[1], leaf.to_pem)
      File.write(paths[2], key.to_pem)
      paths
    end
  end
end
